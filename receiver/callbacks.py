"""The callback endpoint: where TWIN's status callbacks arrive, are checked and are stored.

    POST /callbacks/<CALLBACK_TOKEN>

Store first, answer later, work later still: the request never calls TWIN. A callback is answered
200 only after its event and the message's new status are committed; a refusal is answered with a
4xx whose reason comes from a small vocabulary, and the refused body is kept in `rejected`; a store
that fails (disk full, read-only file, database away) is answered 503 so that TWIN tries again.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import re
from dataclasses import dataclass

from flask import Blueprint, current_app, jsonify, request
from peewee import DatabaseError, InterfaceError, fn
from werkzeug.exceptions import RequestEntityTooLarge

from . import metrics
from .models import Event, Message, Prepared, Rejected, db, slot, utcnow, write_transaction
from .status import check_times, forward_update_for, new_fields_for, variant

log = logging.getLogger(__name__)

bp = Blueprint("callbacks", __name__)

# OPTIONS is listed so that Flask does not answer it by itself (200, whatever the token).
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_ID_LENGTH = 128
MAX_STATUS_LENGTH = 64
INT_RANGE = (-(2**31), 2**31 - 1)   # what an INTEGER column holds on every backend
# The magnitudes (besides 0) a FloatField holds on every backend: on PostgreSQL it is a 4-byte REAL,
# which refuses an overflow or underflow (a 503 on every retry); these are float32's normal range.
FLOAT_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)
# A whole number as text: ASCII digits only (int() also takes "1_000", "+5" and other scripts' digits,
# str.isdigit() takes "²", which int() does not); more than 20 digits is out of range anyway.
WHOLE_NUMBER = re.compile(r"-?[0-9]{1,20}")


class Refusal(Exception):
    """Why a callback was refused: `reason` is one word of a fixed vocabulary, `detail` a sentence."""

    def __init__(self, reason: str, detail: str, http_status: int = 400):
        super().__init__(detail)
        self.reason, self.detail, self.http_status = reason, detail, http_status


@dataclass(frozen=True)
class Callback:
    message_id: str
    new_status: str
    old_status: str | None = None
    new_status_code: int | None = None
    old_status_code: int | None = None
    price: float | None = None
    part_count: int | None = None
    callback_data: str | None = None
    bulk_id: str | None = None
    group_id: str | None = None
    flow_id: str | None = None


@bp.route("/callbacks/<token>", methods=ALL_METHODS)
def receive(token: str):
    """Also answers a method the route does not list (TRACE, PROPFIND...): the app's 405 handler
    hands those here, so that every method gets the same answer."""
    if not hmac.compare_digest(token.encode(), current_app.config["CALLBACK_TOKEN"].encode()):
        # Not ours: say nothing about the endpoint and keep nothing.
        return jsonify(error="not_found"), 404
    try:
        if request.method != "POST":
            raise Refusal("method_not_allowed", f"use POST, not {request.method}", 405)
        fields, raw = read_body()
        callback = parse_callback(fields)
    except Refusal as refusal:
        return refuse(refusal)
    try:
        fresh = store_callback(callback, raw)
    except (DatabaseError, InterfaceError) as error:
        # TWIN retries a callback that was not answered 2xx: ask it to, and say why in the log.
        log.error("could not store callback for message %s: %s", callback.message_id, _why(error))
        metrics.CALLBACKS_UNSTORED.inc()
        response = jsonify(error="storage_unavailable", detail="the callback could not be stored; retry later")
        return response, 503, {"Retry-After": "5"}
    metrics.count_callback(callback.new_status if fresh else None)
    return jsonify(stored=True, duplicate=not fresh), 200


def _why(error: BaseException) -> str:
    """The error with its causes, first cause first: a COMMIT that fails on a full disk surfaces as the
    ROLLBACK that peewee tries after it ("cannot rollback - no transaction is active")."""
    messages: list[str] = []
    while error is not None and len(messages) < 5:
        if str(error) not in messages:
            messages.append(str(error))
        error = error.__context__
    return "; then ".join(reversed(messages))


def read_body() -> tuple[dict, str]:
    """The callback's fields and its body as text, from JSON (TWIN's way) or a form."""
    try:
        data = request.get_data(cache=True)
    except RequestEntityTooLarge:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raise Refusal("payload_too_large", f"the body is larger than {limit} bytes", 413) from None
    mimetype = request.mimetype
    if mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            fields = request.form.to_dict(flat=True)
        except RequestEntityTooLarge:
            # werkzeug's form parser limits parts and part sizes, however small the whole body is.
            raise Refusal("too_many_fields", f"the form has more than {request.max_form_parts} parts, or a "
                          f"field larger than {request.max_form_memory_size} bytes", 413) from None
        if not fields:
            raise Refusal("missing_field", "the form has no fields", 422)
        raw = data.decode("utf-8", "replace")
        if "\x00" in raw:
            raise Refusal("bad_character", "the body contains a NUL character", 422)
        return fields, raw
    if mimetype and mimetype not in ("application/json", "text/plain") and not mimetype.endswith("+json"):
        raise Refusal("unsupported_content_type",
                      f"send application/json (or a form), not {mimetype}", 415)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refusal("bad_encoding", f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise Refusal("unparsable_json", f"the body is not JSON: {str(error)[:200]}") from None
    if not isinstance(document, dict):
        raise Refusal("not_an_object", f"expected a JSON object, got {type(document).__name__}")
    return document, text


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_callback(fields: dict) -> Callback:
    """Check TWIN's fields and their types; unknown fields stay in the raw copy only."""
    return Callback(
        message_id=_text(fields, "id", required=True, limit=MAX_ID_LENGTH),
        new_status=_text(fields, "newStatus", required=True, limit=MAX_STATUS_LENGTH).upper(),
        old_status=_upper(_text(fields, "oldStatus", limit=MAX_STATUS_LENGTH)),
        new_status_code=_integer(fields, "newStatusCode"),
        old_status_code=_integer(fields, "oldStatusCode"),
        price=_number(fields, "price"),
        part_count=_integer(fields, "partCount"),
        callback_data=_opaque(fields.get("callbackData")),
        bulk_id=_text(fields, "bulkId", limit=MAX_ID_LENGTH, numbers=True),
        group_id=_text(fields, "groupId", limit=MAX_ID_LENGTH, numbers=True),
        flow_id=_text(fields, "flowId", limit=MAX_ID_LENGTH, numbers=True),
    )


def _text(fields, name, *, required=False, limit, numbers=False):
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise Refusal("missing_field", f"'{name}' is required", 422)
        return None
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise Refusal("wrong_type", f"'{name}' must be a string, got {_json_type(value)}", 422)
    if len(value) > limit:
        raise Refusal("field_too_long", f"'{name}' is longer than {limit} characters", 422)
    return _storable(value, name)


def _storable(value: str, name: str) -> str:
    """Refuse what no database can keep as text: NUL (PostgreSQL) and unpaired surrogates (UTF-8)."""
    if "\x00" in value:
        raise Refusal("bad_character", f"'{name}' contains a NUL character", 422)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise Refusal("bad_character", f"'{name}' contains an unpaired surrogate "
                      f"(\\u{ord(value[error.start]):04x})", 422) from None
    return value


def _upper(value):
    return value.upper() if value is not None else None


def _integer(fields, name):
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) and WHOLE_NUMBER.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Refusal("wrong_type", f"'{name}' must be a whole number, got {_json_type(value)}", 422)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise Refusal("wrong_type", f"'{name}' is out of range", 422)
    return value


def _number(fields, name):
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):     # not a number, or an integer too large for a float
            number = math.nan
        if math.isfinite(number):
            if number == 0 or FLOAT_RANGE[0] <= abs(number) <= FLOAT_RANGE[1]:
                return number
            raise Refusal("wrong_type", f"'{name}' is out of range", 422)
    raise Refusal("wrong_type", f"'{name}' must be a finite number, got {_json_type(value)}", 422)


def _opaque(value) -> str | None:
    """callbackData is kept exactly as given; a non-string is kept as its JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        return _storable(value, "callbackData")
    return _storable(json.dumps(value, ensure_ascii=False, separators=(",", ":")), "callbackData")


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


IDENTITY = ("callback_data", "bulk_id", "group_id", "flow_id", "price", "part_count")
EVENT_COLUMNS = ("message_id", "old_status", "new_status", "old_status_code", "new_status_code",
                 "price", "part_count", "callback_data", "received_at", "remote_addr", "content_type", "raw")


def _event_insert(_variant):
    return Event.insert(**{name: slot(name) for name in EVENT_COLUMNS}).on_conflict_ignore()


def _message_upsert(variant):
    """Insert the message, or move the stored one forward; `variant` is status.variant() of the status."""
    s = {name: slot(name) for name in ("message_id", "new_status", "new_status_code", "received_at",
                                       "first_check_at", "stale_check_at", *IDENTITY)}
    update = forward_update_for(variant, s["new_status"], s["new_status_code"], s["received_at"],
                                s["first_check_at"])
    # What a later callback adds fills gaps; it never blanks what an earlier one said.
    update.update({getattr(Message, name): fn.COALESCE(getattr(Message, name), s[name]) for name in IDENTITY})
    fields = new_fields_for(variant, s["new_status"], s["new_status_code"], s["received_at"],
                            s["first_check_at"], s["stale_check_at"])
    return Message.insert(id=s["message_id"], **{name: s[name] for name in IDENTITY}, **fields).on_conflict(
        conflict_target=[Message.id], update=update)


EVENT_INSERT = Prepared(_event_insert)
MESSAGE_UPSERT = Prepared(_message_upsert)


def store_callback(callback: Callback, raw: str) -> bool:
    """Append the event and move the message forward, in one transaction. False for an exact repeat."""
    now = utcnow()
    first_check_at, stale_check_at = check_times(now, current_app.config["SETTINGS"])
    values = {
        "message_id": callback.message_id,
        "old_status": callback.old_status, "new_status": callback.new_status,
        "old_status_code": callback.old_status_code, "new_status_code": callback.new_status_code,
        "callback_data": callback.callback_data, "bulk_id": callback.bulk_id, "group_id": callback.group_id,
        "flow_id": callback.flow_id, "price": callback.price, "part_count": callback.part_count,
        "received_at": now, **_sender(Event),
        "raw": raw, "first_check_at": first_check_at, "stale_check_at": stale_check_at,
    }
    with write_transaction():
        if EVENT_INSERT.execute(values).rowcount == 0:
            return False
        MESSAGE_UPSERT.execute(values, variant(callback.new_status))
    return True


def _sender(model) -> dict:
    """The request's client address and Content-Type, cut to `model`'s columns: both come from headers
    of any length, and PostgreSQL refuses (where SQLite keeps) a value longer than its column."""
    return {name: value[:getattr(model, name).max_length] if value else None
            for name, value in (("remote_addr", request.remote_addr), ("content_type", request.content_type))}


def _body_to_keep(refusal: Refusal) -> bytes:
    if refusal.reason == "payload_too_large":
        return b""
    try:
        return request.get_data(cache=True)
    except RequestEntityTooLarge:
        return b""          # a wrong method with an oversized body: the refusal is kept, not the body


def refuse(refusal: Refusal):
    """Answer a refusal and keep what was refused."""
    settings = current_app.config["SETTINGS"]
    body = _body_to_keep(refusal)
    metrics.REJECTED.labels(reason=refusal.reason).inc()
    try:
        with db.atomic():
            Rejected.create(
                reason=refusal.reason, detail=refusal.detail, **_sender(Rejected),
                method=request.method, content_length=request.content_length,
                body=body[: settings.rejected_body_cap],
                body_truncated=len(body) > settings.rejected_body_cap,
            )
    except (DatabaseError, InterfaceError) as error:
        log.error("could not keep a refused callback (%s): %s", refusal.reason, error)
    headers = {"Allow": "POST"} if refusal.http_status == 405 else {}
    return jsonify(error=refusal.reason, detail=refusal.detail), refusal.http_status, headers
