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
# Fields given beside `chat` that are chat settings too (a value here wins over the one in `chat`).
BESIDE_CHAT = ("callbackData",) + destinations.OPTIONS
BODY_FIELDS = ("chat", "destinations", "batchSize", "resendUnknown", "dryRun") + BESIDE_CHAT


@bp.post("/api/sends")
@require_send_token
def create_send():
    """Check the whole body (every problem at once: a 422 naming them), then answer the plan (dryRun,
    200) or record the send for the worker (202)."""
    request.max_content_length = MAX_BODY_BYTES          # this view only; callbacks keep their small cap
    body = json_body("send the mailing as JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise _invalid([_body_problem(None, "must be a JSON object with chat and destinations")])
    # The checks run in this order, and the problems are named in it.
    problems = _unknown_fields(body)
    chat_values = _chat_values(body, problems)
    batch_size = _batch_size(body, problems)
    resend_unknown = _flag(body, "resendUnknown", problems)
    dry_run = _flag(body, "dryRun", problems)
    chat = _chat(chat_values, {name: body[name] for name in BESIDE_CHAT if name in body}, problems)
    rows = _rows(body.get("destinations"), chat, problems)
    settings = current_app.config["SETTINGS"]
    url = settings.callback_url(current_app.config["CALLBACK_TOKEN"])
    problems += destinations.callback_url_problems(url)
    if problems:
        raise _invalid(problems)

    sender = sending.Sender(settings, chat, batch_size=batch_size, resend_unknown=resend_unknown,
                            callback_url=url, source="api")
    if dry_run:
        return jsonify(sender.plan(rows).as_json()), 200
    return _accepted(sender, rows)


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


def _body_problem(name: str | None, message: str) -> destinations.Problem:
    return destinations.Problem("body", name, message)


def _unknown_fields(body: dict) -> list[destinations.Problem]:
    """A problem for each field of the body this API does not take, by name."""
    return [_body_problem(name, "is not a known field") for name in sorted(set(body) - set(BODY_FIELDS))]


def _chat_values(body: dict, problems: list[destinations.Problem]) -> dict:
    """The body's `chat` object ({} when it is not one)."""
    values = body.get("chat")
    if isinstance(values, dict):
        return values
    problems.append(_body_problem("chat", "must be an object of chat settings"))
    return {}


def _batch_size(body: dict, problems: list[destinations.Problem]):
    """`batchSize` as given (None: the default); a whole number of at least 1."""
    size = body.get("batchSize")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        problems.append(_body_problem("batchSize", "must be a whole number of at least 1"))
    return size


def _flag(body: dict, name: str, problems: list[destinations.Problem]):
    """A true-or-false field of the body, false when left out."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        problems.append(_body_problem(name, "must be true or false"))
    return value


def _chat(chat_values: dict, beside: dict, problems: list[destinations.Problem]) -> destinations.ChatSettings | None:
    """The chat settings: those in `chat`, with the fields given beside it (which win over the same
    ones in it). None when they have problems."""
    chat, chat_problems = _chat_settings({**chat_values, **beside})
    if beside.keys() & chat_values.keys():
        # A value beside chat wins over the one in it, but must not hide that that one is wrong.
        chat_problems += [p for p in _chat_settings(chat_values)[1] if p not in chat_problems]
    problems += chat_problems
    return chat


def _chat_settings(values: dict) -> tuple[destinations.ChatSettings | None, list[destinations.Problem]]:
    """(the checked chat settings, []) or (None, their problems)."""
    try:
        return destinations.chat_settings(values, where="chat"), []
    except destinations.InputError as error:
        return None, list(error.problems)


def _rows(items, chat: destinations.ChatSettings | None,
          problems: list[destinations.Problem]) -> list[destinations.Destination]:
    """The body's destinations, checked against the chat's declared variables ([] on a problem)."""
    shape = _destinations_shape(items)
    if shape is not None:
        problems.append(shape)
        return []
    try:
        return destinations.destinations_from_items(items, chat.variables if chat else None)
    except destinations.InputError as error:
        # A problem with the whole list (where "file") is one of the body's `destinations`.
        problems += [_body_problem("destinations", p.message) if p.where == "file" else p for p in error.problems]
        return []


def _destinations_shape(items) -> destinations.Problem | None:
    """What is wrong with `destinations` as a whole: missing, not a list, or too long for one request."""
    if isinstance(items, list) and len(items) > MAX_DESTINATIONS:
        return _body_problem("destinations", f"has {len(items)} items; at most {MAX_DESTINATIONS} per request "
                             "(use several, or `flask send`)")
    if items is None:
        return _body_problem("destinations", "is required")
    if not isinstance(items, list):
        return _body_problem("destinations", "must be a list of destinations")
    return None


def _accepted(sender: sending.Sender, rows: list[destinations.Destination]):
    """Record the send and its rows for the worker: 202, with its first page of progress."""
    if not sender.settings.has_twin24_credentials:
        raise ApiError(503, "not_configured", "set TWIN24_TOKEN, or TWIN24_LOGIN and TWIN24_PASSWORD")
    send = sender.accept(rows)
    report = sending.progress(send.id, PAGE_ROWS)
    report.overlap = sender.overlap(send.id, rows)
    answer = _progress_json(report)
    return jsonify(answer), 202, {"Location": answer["url"]}


def _progress_json(report: sending.SendReport) -> dict:
    return {**report.as_json(), "url": url_for("sending_api.send_progress", send_id=report.send_id)}


def _invalid(problems: list[destinations.Problem]) -> ApiError:
    return ApiError(422, "invalid_input", "nothing was stored or sent", problems=[p.as_json() for p in problems])
