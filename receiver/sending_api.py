"""POST /api/sends and GET /api/sends/<id>: a mailing sent over HTTP (behind SEND_TOKEN; off without it).

Rule: the request never calls TWIN (one call may take a minute, longer than gunicorn lets a request
live, and a request killed mid-send would leave its rows `unknown`). It checks the input, records the
send and its rows (`Sender.accept`) and answers 202; the worker sends them (sending.send_pending), by
the same rules as `flask send`. The body, the answers and the progress: docs/sending.md.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request, url_for

from . import destinations, sending
from .auth import require_send_token, require_token
from .errors import ApiError, bad_parameter, json_body

bp = Blueprint("sending_api", __name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_DESTINATIONS = 20000          # larger lists: `flask send`, or several requests
PAGE_ROWS = 1000                  # rows of a send per answer (GET /api/sends/<id>, the 202), at most
# A send id is a 64-bit integer at most (SQLite cannot even compare a larger one): past it, no send.
MAX_SEND_ID = 2**63 - 1


@bp.post("/api/sends")
@require_send_token
def create_send():
    request.max_content_length = MAX_BODY_BYTES          # this view only; callbacks keep their small cap
    body = json_body("send the mailing as JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise _invalid([destinations.Problem("body", None, "must be a JSON object with chat and destinations")])
    problems: list[destinations.Problem] = []
    beside_chat = ("callbackData",) + destinations.OPTIONS
    unknown = sorted(set(body) - {"chat", "destinations", "batchSize", "resendUnknown", "dryRun", *beside_chat})
    problems += [destinations.Problem("body", name, "is not a known field") for name in unknown]
    chat_values = body.get("chat")
    if not isinstance(chat_values, dict):
        problems.append(destinations.Problem("body", "chat", "must be an object of chat settings"))
        chat_values = {}
    beside = {name: body[name] for name in beside_chat if name in body}
    batch_size = body.get("batchSize")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        problems.append(destinations.Problem("body", "batchSize", "must be a whole number of at least 1"))
    flags = {}
    for name in ("resendUnknown", "dryRun"):
        flags[name] = body.get(name, False)
        if not isinstance(flags[name], bool):
            problems.append(destinations.Problem("body", name, "must be true or false"))
    chat, chat_problems = _chat_settings({**chat_values, **beside})
    if beside.keys() & chat_values.keys():
        # A value beside chat wins over the one in it, but must not hide that that one is wrong.
        chat_problems += [p for p in _chat_settings(chat_values)[1] if p not in chat_problems]
    problems += chat_problems
    items = body.get("destinations")
    rows = []
    if isinstance(items, list) and len(items) > MAX_DESTINATIONS:
        problems.append(destinations.Problem("body", "destinations", f"has {len(items)} items; at most "
                                             f"{MAX_DESTINATIONS} per request (use several, or `flask send`)"))
    elif items is None:
        problems.append(destinations.Problem("body", "destinations", "is required"))
    elif not isinstance(items, list):
        problems.append(destinations.Problem("body", "destinations", "must be a list of destinations"))
    else:
        try:
            rows = destinations.destinations_from_items(items, chat.variables if chat else None)
        except destinations.InputError as error:
            problems += [destinations.Problem(p.where if p.where != "file" else "body",
                                              p.field if p.where != "file" else "destinations", p.message)
                         for p in error.problems]
    settings = current_app.config["SETTINGS"]
    url = settings.callback_url(current_app.config["CALLBACK_TOKEN"])
    problems += destinations.callback_url_problems(url)
    if problems:
        raise _invalid(problems)

    sender = sending.Sender(settings, chat, batch_size=batch_size, resend_unknown=flags["resendUnknown"],
                            callback_url=url, source="api")
    if flags["dryRun"]:
        return jsonify(sender.plan(rows).as_json()), 200
    if not settings.has_twin24_credentials:
        raise ApiError(503, "not_configured", "set TWIN24_TOKEN, or TWIN24_LOGIN and TWIN24_PASSWORD")
    send = sender.accept(rows)
    report = sending.progress(send.id, PAGE_ROWS)
    report.overlap = sender.overlap(send.id, rows)
    answer = _progress_json(report)
    return jsonify(answer), 202, {"Location": answer["url"]}


@bp.get("/api/sends/<int:send_id>")
@require_token("API_TOKEN", "SEND_TOKEN")
def send_progress(send_id: int):
    """Where a send stands: `status` (queued, sending, done), counts per row state (of every row),
    and its rows a page at a time (`limit`, and `cursor` from the page before)."""
    unknown = sorted(set(request.args) - {"limit", "cursor"})
    if unknown:
        raise bad_parameter(unknown[0], "unknown parameter; known: cursor, limit")
    limit = request.args.get("limit", str(PAGE_ROWS))
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= PAGE_ROWS):
        raise bad_parameter("limit", f"a whole number from 1 to {PAGE_ROWS}")
    cursor = request.args.get("cursor", "0")
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise bad_parameter("cursor", "not a cursor this API gave out (the nextCursor of a page)")
    report = sending.progress(send_id, int(limit), after=int(cursor)) if send_id <= MAX_SEND_ID else None
    if report is None:
        raise ApiError(404, "not_found", f"there is no send #{send_id}")
    return jsonify(_progress_json(report))


def _chat_settings(values: dict) -> tuple[destinations.ChatSettings | None, list[destinations.Problem]]:
    """(the checked chat settings, []) or (None, their problems)."""
    try:
        return destinations.chat_settings(values, where="chat"), []
    except destinations.InputError as error:
        return None, list(error.problems)


def _progress_json(report: sending.SendReport) -> dict:
    return {**report.as_json(), "url": url_for("sending_api.send_progress", send_id=report.send_id)}


def _invalid(problems: list[destinations.Problem]) -> ApiError:
    return ApiError(422, "invalid_input", "nothing was stored or sent", problems=[p.as_json() for p in problems])
