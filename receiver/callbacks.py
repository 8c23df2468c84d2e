"""The callback endpoint: where TWIN's status callbacks arrive, are read and are stored.

    POST /callbacks/<CALLBACK_TOKEN>

Store first, answer later, work later still: the request never calls TWIN. A callback is answered
200 only after its event and the message's new status are committed. Only what names no message or
no status is refused (a 4xx whose reason comes from a small vocabulary, the body kept in `rejected`);
an optional field that cannot be read is stored as null, the raw body keeping what came. A store that
fails (disk full, read-only file, database away) is answered 503 so that TWIN tries again.
`accept()` is the one way a body becomes stored callbacks: the endpoint's, and a replay's (rejected.py).
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field

from flask import Blueprint, current_app, jsonify, request
from peewee import DatabaseError, InterfaceError, fn
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from . import errors, forwarding, jsonbody, metrics
from .db import Prepared, db, slot, utcnow, write_transaction
from .errors import ApiError
from .models import Event, Message, Rejected
from .status import STATUS_OF_CODE, check_times, forward_update_for, new_fields_for, variant

log = logging.getLogger(__name__)

bp = Blueprint("callbacks", __name__)

# OPTIONS is listed so that Flask does not answer it by itself (200, whatever the token).
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
MAX_ID_LENGTH = 128
MAX_STATUS_LENGTH = 64
# An array body is a tolerance (TWIN posts one object per callback): each item is a transaction and a
# refused item a kept row, so a 64 KB body of `[1,1,...]` must not become 30,000 of them.
MAX_ITEMS = 500
INT_RANGE = (-(2**31), 2**31 - 1)   # what an INTEGER column holds on every backend
# The magnitudes (besides 0) a FloatField holds on every backend: on PostgreSQL it is a 4-byte REAL,
# which refuses an overflow or underflow (a 503 on every retry); these are float32's normal range.
FLOAT_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)
# A whole number as text: ASCII digits only (int() also takes "1_000", "+5" and other scripts' digits,
# str.isdigit() takes "²", which int() does not); more than 20 digits is out of range anyway.
WHOLE_NUMBER = re.compile(r"-?[0-9]{1,20}")
# A decimal number as text, ASCII only (float() also takes "1_000", "٣", "nan"). The separator may be
# a comma: TWIN is Russian, and Russian writes 2.5 as "2,5" and groups thousands with spaces, never
# with commas, so one comma between digits can only be the decimal separator.
DECIMAL_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:[.,][0-9]*)?|[.,][0-9]+)(?:[eE][-+]?[0-9]{1,3})?")


class Refusal(ApiError):
    """Why a callback was refused: `reason` is one word of a fixed vocabulary, `detail` a sentence.
    `body` is what to keep of an array's item (None: the request's body)."""

    def __init__(self, reason: str, detail: str, http_status: int = 400, body: bytes | None = None):
        super().__init__(http_status, reason, detail, headers={"Allow": "POST"} if http_status == 405 else None)
        self.body = body


class Unstored(Exception):
    """The database could not store a callback (the cause is chained): the sender should retry."""

    def __init__(self, message_id: str):
        super().__init__(message_id)
        self.message_id = message_id


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
    raw: str = ""                          # what its event keeps: the body, or its item of an array
    unreadable: tuple[str, ...] = ()       # optional fields stored as null: they could not be read


@dataclass(frozen=True)
class Outcome:
    """What became of one callback of a body: stored, an exact repeat, or refused."""
    callback: Callback | None = None
    refusal: Refusal | None = None
    duplicate: bool = False

    @property
    def kind(self) -> str:
        return "refused" if self.refusal else "duplicate" if self.duplicate else "stored"

    def as_json(self) -> dict:
        if self.refusal:
            return self.refusal.as_json()
        answer = {"stored": True, "duplicate": self.duplicate}
        if self.callback.unreadable:
            answer["unreadable"] = list(self.callback.unreadable)
        return answer


@dataclass
class Accepted:
    """A body's outcomes, in its order; `is_array` when the body was a JSON array of callbacks."""
    is_array: bool
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {"stored": 0, "duplicate": 0, "refused": 0}
        for outcome in self.outcomes:
            counts[outcome.kind] += 1
        return counts


# ---- the endpoint ---------------------------------------------------------------------------------

@bp.route("/callbacks/<token>", methods=ALL_METHODS)
def receive(token: str):
    """Also answers a method the route does not list (TRACE, PROPFIND...): the app's 405 handler
    hands those here, so that every method gets the same answer."""
    which = token_kind(token)
    if which is None:
        # Not ours: say nothing about the endpoint and keep nothing.
        return errors.answer(ApiError(404, "not_found"))
    if which == "previous":
        note_previous_token()
    try:
        if request.method != "POST":
            raise Refusal("method_not_allowed", f"use POST, not {request.method}", 405)
        accepted = accept(read_body(), request.content_type, request.remote_addr)
    except Refusal as refusal:
        return refuse(refusal)
    except Unstored as error:
        return answer_unstored(error)
    return answer_accepted(accepted)


def answer_accepted(accepted: Accepted):
    if not accepted.is_array:
        outcome = accepted.outcomes[0]
        return refuse(outcome.refusal) if outcome.refusal else answer_stored(outcome)
    return answer_array(accepted)


def answer_unstored(error: Unstored):
    """503: TWIN retries a callback that was not answered 2xx; ask it to, and say why in the log."""
    log.error("could not store callback for message %s: %s", error.message_id, _why(error.__cause__))
    metrics.CALLBACKS_UNSTORED.inc()
    return errors.answer(ApiError(503, "storage_unavailable", "the callback could not be stored; retry later",
                                  headers={"Retry-After": "5"}))


def answer_stored(outcome: Outcome):
    """200 with the outcome. Nearly every callback gets one of two answers, made once: jsonify's
    encoder setup costs more than the rest of the answer."""
    usual = usual_answer(outcome)
    if usual is None:
        return jsonify(outcome.as_json()), 200
    return current_app.response_class(_STORED_ANSWER[usual], status=200, mimetype="application/json")


def usual_answer(outcome: Outcome) -> bool | None:
    """Which of answer_stored's two usual answers a lone callback's outcome gets (its `duplicate`), or None
    for any other answer. They depend on nothing else, so the direct path makes each only once."""
    if outcome.refusal or outcome.callback.unreadable:
        return None
    return outcome.duplicate


_STORED_ANSWER = {duplicate: json.dumps({"stored": True, "duplicate": duplicate}, separators=(",", ":")) + "\n"
                  for duplicate in (False, True)}


def token_kind(token: str, config=None) -> str | None:
    """"current" for CALLBACK_TOKEN, "previous" for CALLBACK_TOKEN_PREVIOUS (callbacks of sends made
    before a rotation), None for anything else; compared in constant time. `config`: the app's
    (default: current_app's)."""
    config = current_app.config if config is None else config
    for kind, expected in (("current", config["CALLBACK_TOKEN"]),
                           ("previous", config.get("CALLBACK_TOKEN_PREVIOUS"))):
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return kind
    return None


PREVIOUS_TOKEN_LOG_EVERY = 600.0        # seconds: one line per process, however many callbacks come


def note_previous_token() -> None:
    """Count a callback that came with the previous token, and say so in the log now and then: while
    they come, CALLBACK_TOKEN_PREVIOUS must stay."""
    metrics.CALLBACKS_PREVIOUS_TOKEN.inc()
    now = time.monotonic()
    last = current_app.extensions.get("receiver.previous_token_logged")
    if last is None or now - last >= PREVIOUS_TOKEN_LOG_EVERY:
        current_app.extensions["receiver.previous_token_logged"] = now
        log.info("a callback came with CALLBACK_TOKEN_PREVIOUS: TWIN still sends to the callback URL from "
                 "before the rotation; keep the previous token until these stop "
                 "(receiver_callbacks_previous_token_total)")


def answer_array(accepted: Accepted):
    """Per item what a lone callback would have been answered, and the counts. Refused items are kept;
    the array is refused as a whole (with its first item's reason) only when none of it was stored."""
    refusals = [outcome.refusal for outcome in accepted.outcomes if outcome.refusal]
    keep_refused(refusals)
    answer = {"counts": accepted.counts(), "items": [outcome.as_json() for outcome in accepted.outcomes]}
    if len(refusals) < len(accepted.outcomes):
        return jsonify(answer), 200
    first = refusals[0]
    detail = f"none of the {len(refusals)} callbacks of the array could be stored; {first.detail}"
    return errors.answer(ApiError(first.status, first.reason, detail, **answer))


def _why(error: BaseException) -> str:
    """The error with its causes, first cause first: a COMMIT that fails on a full disk surfaces as the
    ROLLBACK that peewee tries after it ("cannot rollback - no transaction is active")."""
    messages: list[str] = []
    while error is not None and len(messages) < 5:
        if str(error) not in messages:
            messages.append(str(error))
        error = error.__context__
    return "; then ".join(reversed(messages))


def read_body() -> bytes:
    try:
        return request.get_data(cache=True)
    except RequestEntityTooLarge:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raise Refusal("payload_too_large", f"the body is larger than {limit} bytes", 413) from None


# ---- the direct path ------------------------------------------------------------------------------

CALLBACKS_PREFIX = "/callbacks/"


class DirectPath:
    """The app's WSGI entry: the usual callback goes from it straight to parse_body and store_items.

    Nearly every request the receiver gets is TWIN posting one JSON object with the current token, and
    for such a callback Flask's request context, routing, hooks and Response cost about as much CPU as
    storing it (docs/performance.md, "Ingest"). Here it is read, stored and answered by the functions
    `receive` uses, inside an app context, with the app's own hooks (`before`, `after`; the app
    context's teardown runs as under Flask). Everything else goes to Flask (`flask_wsgi`): another
    path or method, the previous token, no Content-Length or one over MAX_CONTENT_LENGTH, and a body
    that is refused or is an array, which Flask reads again from the bytes read here, before anything
    of it is stored. An unexpected error is Flask's too: logged and answered 500, as from a view.
    """

    def __init__(self, app, flask_wsgi, before, after):
        self.app, self.flask_wsgi = app, flask_wsgi
        self.before, self.after = before, after
        self._usual: dict[bool, tuple[str, list, bytes]] = {}     # usual_answer() -> the answer, once made

    def __call__(self, environ, start_response):
        length = self._direct_length(environ)
        if length is None:
            return self.flask_wsgi(environ, start_response)
        data = environ["wsgi.input"].read(length)
        try:
            answer = self._store(environ, data) if len(data) == length else None
        except Exception as error:          # noqa: BLE001 (Flask's own handling, as for a view)
            return self._internal_error(error, environ, start_response)
        if answer is None:
            environ["wsgi.input"] = io.BytesIO(data)
            return self.flask_wsgi(environ, start_response)
        status, headers, body = answer
        start_response(status, list(headers))
        return [body]

    def _direct_length(self, environ) -> int | None:
        """The body's length when this request is a POST to the current token's callback URL with a
        Content-Length the app takes; None for a request Flask should have."""
        path = environ.get("PATH_INFO", "")
        if (environ.get("REQUEST_METHOD") != "POST" or not path.startswith(CALLBACKS_PREFIX)
                or "HTTP_TRANSFER_ENCODING" in environ or not self._current_token(path[len(CALLBACKS_PREFIX):])):
            return None
        length = environ.get("CONTENT_LENGTH", "")
        if not (length.isascii() and length.isdigit()):
            return None
        limit = self.app.config["MAX_CONTENT_LENGTH"]
        return int(length) if limit is None or int(length) <= limit else None

    def _current_token(self, token: str) -> bool:
        """Whether the path's last segment is CALLBACK_TOKEN (token_kind's "current"). PATH_INFO holds
        the path's bytes as latin-1; Flask decodes them as UTF-8 before routing, and so does this."""
        if "/" in token:
            return False
        try:
            token = token.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return False
        return token_kind(token, self.app.config) == "current"

    def _store(self, environ, data: bytes) -> tuple[str, list, bytes] | None:
        """The answer `receive` gives a lone callback (status, headers, body), or None when Flask should
        answer: a refusal or an array, of which nothing was stored."""
        content_type = environ.get("CONTENT_TYPE")
        with self.app.app_context():
            self.before()
            try:
                is_array, items = parse_body(data, content_type)
            except Refusal:
                return None
            if is_array or isinstance(items[0], Refusal):
                return None
            try:
                accepted = store_items(is_array, items, content_type, environ.get("REMOTE_ADDR"))
            except Unstored as error:
                return self._wsgi_answer(environ, answer_unstored(error))
            usual = usual_answer(accepted.outcomes[0])
            if usual is None:
                return self._wsgi_answer(environ, answer_accepted(accepted))
            if usual not in self._usual:
                self._usual[usual] = self._wsgi_answer(environ, answer_accepted(accepted))
            return self._usual[usual]

    def _wsgi_answer(self, environ, answer) -> tuple[str, list, bytes]:
        """A view's return value as Flask sends it: a Response, after the app's hooks; its WSGI parts."""
        response = self.after(self.app.make_response(answer))
        body, status, headers = response.get_wsgi_response(environ)
        try:
            return status, headers, b"".join(body)
        finally:
            body.close()

    def _internal_error(self, error: Exception, environ, start_response):
        """What Flask does with an exception a view raises: log it and answer 500 (raise it when testing)."""
        with self.app.request_context(environ):
            return self.app.handle_exception(error)(environ, start_response)


# ---- one body, from the endpoint or a replay ---------------------------------------------------------

def accept(data: bytes, content_type: str | None, remote_addr: str | None) -> Accepted:
    """Read a body and store each callback in it, each in a transaction of its own (so a failure
    halfway leaves the stored ones stored, and the sender's retry finds them as exact repeats).

    Raises Refusal when the body as a whole cannot be read, and Unstored when the database fails."""
    is_array, items = parse_body(data, content_type)
    return store_items(is_array, items, content_type, remote_addr)


def store_items(is_array: bool, items: list[Callback | Refusal], content_type: str | None,
                remote_addr: str | None) -> Accepted:
    """Store the callbacks parse_body found, each in a transaction of its own; a Refusal is only noted."""
    sender = _cut_to(Event, remote_addr=remote_addr, content_type=content_type)
    accepted = Accepted(is_array)
    for item in items:
        if isinstance(item, Refusal):
            accepted.outcomes.append(Outcome(refusal=item))
            continue
        try:
            fresh = store_callback(item, sender)
        except (DatabaseError, InterfaceError) as error:
            raise Unstored(item.message_id) from error
        metrics.count_callback(item.new_status if fresh else None)
        for name in item.unreadable:
            metrics.CALLBACK_FIELDS_DROPPED.labels(field=name).inc()
        accepted.outcomes.append(Outcome(callback=item, duplicate=not fresh))
    return accepted


def parse_body(data: bytes, content_type: str | None) -> tuple[bool, list[Callback | Refusal]]:
    """(whether the body is an array, its callbacks): from JSON (TWIN's way: one object, or an array
    of them) or a form. An item that names no message or no status is a Refusal in the list; a body
    that cannot be read at all raises one."""
    mimetype, options = parse_options_header(content_type)
    mimetype = mimetype.lower()
    if mimetype in FORM_TYPES:
        return False, [_parse_form(data, mimetype, options)]
    if mimetype and mimetype not in ("application/json", "text/plain") and not mimetype.endswith("+json"):
        raise Refusal("unsupported_content_type", f"send application/json (or a form), not {mimetype}", 415)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refusal("bad_encoding", f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        document = jsonbody.loads(text)
    except jsonbody.TooDeep as error:
        raise Refusal("unparsable_json", f"the body is {error}") from None
    except ValueError as error:
        raise Refusal("unparsable_json", f"the body is not JSON: {str(error)[:200]}") from None
    if isinstance(document, dict):
        return False, [_parse_or_refusal(document, text)]
    if not isinstance(document, list):
        raise Refusal("not_an_object", f"expected a JSON object (or an array of them), got {_json_type(document)}")
    if not document:
        raise Refusal("empty_array", "the array holds no callback")
    if len(document) > MAX_ITEMS:
        raise Refusal("too_many_items", f"the array holds {len(document)} items; at most {MAX_ITEMS}", 413)
    return True, [_parse_item(number, item) for number, item in enumerate(document)]


def _parse_form(data: bytes, mimetype: str, options: dict) -> Callback | Refusal:
    config = current_app.config
    parser = FormDataParser(max_form_memory_size=config.get("MAX_FORM_MEMORY_SIZE", 500_000),
                            max_form_parts=config.get("MAX_FORM_PARTS", 1000))
    try:
        _, form, _ = parser.parse(io.BytesIO(data), mimetype, len(data), options)
    except RequestEntityTooLarge:
        # werkzeug's form parser limits parts and part sizes, however small the whole body is.
        raise Refusal("too_many_fields", f"the form has more than {parser.max_form_parts} parts, or a "
                      f"field larger than {parser.max_form_memory_size} bytes", 413) from None
    fields = form.to_dict(flat=True)
    if not fields:
        raise Refusal("missing_field", "the form has no fields", 422)
    raw = data.decode("utf-8", "replace")
    if "\x00" in raw:
        # The raw copy is text, and PostgreSQL's text cannot hold NUL: a body it cannot keep is refused.
        raise Refusal("bad_character", "the body contains a NUL character", 422)
    return _parse_or_refusal(fields, raw)


def _parse_item(number: int, item) -> Callback | Refusal:
    """One item of an array body; its event keeps the item's own JSON text, not the whole array."""
    text = _json_text(item)
    if not isinstance(item, dict):
        return Refusal("not_an_object", f"item {number}: expected a JSON object, got {_json_type(item)}",
                       body=text.encode())
    parsed = _parse_or_refusal(item, text)
    if isinstance(parsed, Refusal):
        parsed.detail = f"item {number}: {parsed.detail}"
        parsed.body = text.encode()
    return parsed


def _json_text(value) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:      # an unpaired surrogate (a "\ud800" escape) has no UTF-8: escape it
        text = json.dumps(value, separators=(",", ":"))
    return text


def _parse_or_refusal(fields: dict, raw: str) -> Callback | Refusal:
    try:
        return parse_callback(fields, raw)
    except Refusal as refusal:
        return refusal


def parse_callback(fields: dict, raw: str = "") -> Callback:
    """Read TWIN's fields. Refused only without a readable message id or status; an optional field
    that cannot be read is None (and named in `unreadable`); unknown fields stay in the raw copy."""
    unreadable: list[str] = []

    def optional(read, name, **options):
        try:
            return read(fields, name, **options)
        except Refusal:
            unreadable.append(name)
            return None

    new_code = optional(_integer, "newStatusCode")
    old_code = optional(_integer, "oldStatusCode")
    return Callback(
        message_id=_text(fields, "id", required=True, limit=MAX_ID_LENGTH, numbers=True),
        new_status=_status(fields, "newStatus", new_code, unreadable, required=True),
        old_status=_status(fields, "oldStatus", old_code, unreadable),
        new_status_code=new_code,
        old_status_code=old_code,
        price=optional(_number, "price"),
        part_count=optional(_integer, "partCount"),
        callback_data=optional(_opaque, "callbackData"),
        bulk_id=optional(_text, "bulkId", limit=MAX_ID_LENGTH, numbers=True),
        group_id=optional(_text, "groupId", limit=MAX_ID_LENGTH, numbers=True),
        flow_id=optional(_text, "flowId", limit=MAX_ID_LENGTH, numbers=True),
        raw=raw,
        unreadable=tuple(unreadable),
    )


def _status(fields, name, code, unreadable: list, required=False) -> str | None:
    """The status as given, else the one its code confirms (2 PENDING, 6 DELIVERED: the only codes TWIN
    confirms); a required status that neither gives is refused with the status field's own reason."""
    try:
        status = _text(fields, name, limit=MAX_STATUS_LENGTH)
        problem = None
    except Refusal as refusal:
        status, problem = None, refusal
        unreadable.append(name)
    if status is not None:
        return status.upper()
    if code in STATUS_OF_CODE:
        return STATUS_OF_CODE[code]
    if required:
        raise problem or Refusal("missing_field", f"'{name}' is required (or a {name}Code of 2 or 6)", 422)
    return None


def _text(fields, name, *, required=False, limit, numbers=False):
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise Refusal("missing_field", f"'{name}' is required", 422)
        return None
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif numbers and isinstance(value, float) and math.isfinite(value):
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
    if isinstance(value, str) and DECIMAL_NUMBER.fullmatch(value.strip()):
        value = float(value.strip().replace(",", "."))
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:           # an integer too large for a float
            raise Refusal("wrong_type", f"'{name}' is out of range", 422) from None
    if not isinstance(value, float) or not math.isfinite(value):
        raise Refusal("wrong_type", f"'{name}' must be a finite number, got {_json_type(value)}", 422)
    if value != 0 and not FLOAT_RANGE[0] <= abs(value) <= FLOAT_RANGE[1]:
        raise Refusal("wrong_type", f"'{name}' is out of range", 422)
    return value


def _opaque(fields, name) -> str | None:
    """callbackData is kept exactly as given; a non-string is kept as its JSON text."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return _storable(value, name)
    return _storable(json.dumps(value, ensure_ascii=False, separators=(",", ":")), name)


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# ---- storing -------------------------------------------------------------------------------------

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


def store_callback(callback: Callback, sender: dict) -> bool:
    """Append the event and move the message forward, in one transaction. False for an exact repeat.
    `sender` holds the event's remote_addr and content_type."""
    now = utcnow()
    first_check_at, stale_check_at = check_times(now, current_app.config["SETTINGS"])
    values = {
        "message_id": callback.message_id,
        "old_status": callback.old_status, "new_status": callback.new_status,
        "old_status_code": callback.old_status_code, "new_status_code": callback.new_status_code,
        "callback_data": callback.callback_data, "bulk_id": callback.bulk_id, "group_id": callback.group_id,
        "flow_id": callback.flow_id, "price": callback.price, "part_count": callback.part_count,
        "received_at": now, "remote_addr": sender.get("remote_addr"), "content_type": sender.get("content_type"),
        "raw": callback.raw, "first_check_at": first_check_at, "stale_check_at": stale_check_at,
    }
    status_wanted = forwarding.wants(forwarding.EVENT_STATUS)    # cached: most receivers forward no statuses
    with write_transaction():
        if EVENT_INSERT.execute(values).rowcount == 0:
            return False
        MESSAGE_UPSERT.execute(values, variant(callback.new_status))
        if status_wanted:
            # Only a status that moved forward: an older one arriving late leaves the row's status as it was.
            forwarding.emit(forwarding.EVENT_STATUS, [callback.message_id], now,
                            when=lambda row: row["status"] == callback.new_status)
    return True


def _cut_to(model, **values) -> dict:
    """Values cut to `model`'s columns: the client address and Content-Type come from headers of any
    length, and PostgreSQL refuses (where SQLite keeps) a value longer than its column."""
    return {name: value[:getattr(model, name).max_length] if value else None for name, value in values.items()}


# ---- keeping what was refused ----------------------------------------------------------------------

def _body_to_keep(refusal: Refusal) -> bytes:
    if refusal.body is not None:
        return refusal.body
    if refusal.reason == "payload_too_large":
        return b""
    try:
        return request.get_data(cache=True)
    except RequestEntityTooLarge:
        return b""          # a wrong method with an oversized body: the refusal is kept, not the body


def refuse(refusal: Refusal):
    """Answer a refusal and keep what was refused."""
    keep_refused([refusal])
    return errors.answer(refusal)


def keep_refused(refusals: list[Refusal]) -> None:
    """Keep refusals of this request in `rejected` (one INSERT), so that nothing is lost silently."""
    if not refusals:
        return
    cap = current_app.config["SETTINGS"].rejected_body_cap
    sender = _cut_to(Rejected, remote_addr=request.remote_addr, content_type=request.content_type)
    rows = []
    for refusal in refusals:
        metrics.REJECTED.labels(reason=refusal.reason).inc()
        body = _body_to_keep(refusal)
        rows.append(dict(reason=refusal.reason, detail=refusal.detail, **sender, method=request.method,
                         content_length=request.content_length, body=body[:cap], body_truncated=len(body) > cap,
                         received_at=utcnow()))
    try:
        with db.atomic():
            Rejected.insert_many(rows).execute()
    except (DatabaseError, InterfaceError) as error:
        log.error("could not keep %d refused callbacks (%s): %s", len(rows), refusals[0].reason, error)
