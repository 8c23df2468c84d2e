"""Step 1 of the recipe: send a mailing through TWIN with callbackUrl pointing at this receiver.

Sending through the receiver links each phone number to its TWIN message id: TWIN answers a send
with one item per destination, in the order of `destinations`, and the callbacks carry no phone.

Three parts:

* reading and checking the destinations (CSV or JSON) and the chat settings, all before anything
  is sent; every problem names the line (or item) and the field;
* the durable record of a send: `Send` (one mailing) and `Outbox` (one row per phone), written
  BEFORE each TWIN call (rows `in_flight`) and AFTER it (rows `sent` with their message ids, and
  the `message` rows with phone, variables and index, so the first callback finds them);
* the send loop: batches of `send_batch_size` destinations in ONE message object each, so the answer
  matches the batch position by position; it stops at the first batch that fails.

The state of an outbox row (docs/sending.md says the same for users):

    pending ──▶ in_flight ──▶ sent          TWIN answered with the message id
                          ├─▶ rejected      TWIN answered 4xx: not taken; a rerun sends it again
                          ├─▶ not_taken     provably never reached TWIN; a rerun sends it again
                          └─▶ unknown       timeout / 5xx / dropped answer / crash while out:
                                            TWIN may have taken it; a rerun reports it and does NOT
                                            send it again unless told to (resend_unknown)

Which mailing a run belongs to: the `key` of a send is a hash of the chat settings and the
callbackData (not of the destination list), and rows are identified by phone within the send. So a
rerun continues where the last run stopped even when the file was edited in between (a row fixed,
rows added): a phone already sent (or unknown) in this mailing is never sent again by a rerun.
To send the same text to the same people again on purpose, use another callbackData.
"""
from __future__ import annotations

import configparser
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import re
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peewee import fn

from .models import Message, Outbox, Send, db, utcnow
from .status import forward_update, new_message_fields

log = logging.getLogger(__name__)

# Outbox row states.
PENDING = "pending"
IN_FLIGHT = "in_flight"
SENT = "sent"
REJECTED = "rejected"
NOT_TAKEN = "not_taken"
UNKNOWN = "unknown"
STATES = (PENDING, IN_FLIGHT, SENT, REJECTED, NOT_TAKEN, UNKNOWN)
SENDABLE = (PENDING, NOT_TAKEN, REJECTED)      # provably not taken by TWIN: safe to send (again)

PHONE_FIELD = "phone"
MUID_FIELD = "messengerUserId"
VARIABLES_FIELD = "variables"
MAX_PHONE_DIGITS, MIN_PHONE_DIGITS = 15, 10
MAX_MUID_LENGTH = 128
MAX_PROBLEMS_SHOWN = 20
_PHONE_NOISE = re.compile(r"[\s\-().\u00a0]")

# The chat settings: (name in TWIN's body, CLI option, required, default).
CHAT_FIELDS = (
    ("chatId", "--chat-id", True, None),
    ("botId", "--bot-id", True, None),
    ("messengerType", "--messenger-type", True, "WHATSAPP"),
    ("chatSessionName", "--chat-session-name", False, None),
    ("text", "--text", True, None),
    ("provider", "--provider", True, "TWIN"),
)
CONFIG_KEYS = tuple(name for name, *_ in CHAT_FIELDS) + ("callbackData", "variables")


# ------------------------------------------------------------------------------------------ input
@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (e.g. "line 7"), which field, what."""
    where: str
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}, {self.field}: {self.message}" if self.field else f"{self.where}: {self.message}"

    def as_json(self) -> dict:
        return {"where": self.where, "field": self.field, "message": self.message}


class InputError(ValueError):
    """The destinations or the chat settings are not usable; nothing was sent."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        super().__init__("\n".join(shown))


@dataclass(frozen=True)
class Destination:
    index: int                      # 0-based position in the file (the destination index)
    line: int                       # line of the file (CSV, JSON file) or item number (API)
    phone: str                      # digits only
    messenger_user_id: str | None
    variables: dict[str, str]

    def payload(self) -> dict:
        item: dict[str, Any] = {"phone": self.phone}
        if self.messenger_user_id:
            item["messengerUserId"] = self.messenger_user_id
        if self.variables:
            item["variables"] = dict(self.variables)
        return item


@dataclass(frozen=True)
class ChatSettings:
    chat_id: str
    bot_id: str
    text: str
    messenger_type: str = "WHATSAPP"
    provider: str = "TWIN"
    chat_session_name: str | None = None
    callback_data: str | None = None
    variables: tuple[str, ...] | None = None   # declared variable names; None: any column is one

    def chat_json(self) -> dict:
        chat = {"chatId": self.chat_id, "botId": self.bot_id, "messengerType": self.messenger_type,
                "text": self.text, "provider": self.provider}
        if self.chat_session_name:
            chat["chatSessionName"] = self.chat_session_name
        return chat

    @property
    def key(self) -> str:
        """Which mailing this is: the chat settings and the callbackData (see the module docstring)."""
        canonical = json.dumps({"chat": self.chat_json(), "callbackData": self.callback_data},
                               sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalize_phone(raw) -> str | None:
    """Digits only (a leading + and spaces, dashes, dots and brackets dropped), or None if not a phone."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, int):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    text = _PHONE_NOISE.sub("", raw.strip())
    if text.startswith("+"):
        text = text[1:]
    if not text.isascii() or not text.isdigit() or not MIN_PHONE_DIGITS <= len(text) <= MAX_PHONE_DIGITS:
        return None
    return text


def _check_rows(rows: Iterable[tuple[str, int, dict]], declared: tuple[str, ...] | None) -> list[Destination]:
    """Turn (where, line, fields) rows into destinations, or raise InputError naming every problem.

    `fields` maps names to values: phone, messengerUserId, and variables (flat, already merged)."""
    problems: list[Problem] = []
    destinations: list[Destination] = []
    first_seen: dict[str, str] = {}
    for where, line, fields in rows:
        before = len(problems)
        raw_phone = fields.get(PHONE_FIELD)
        phone = normalize_phone(raw_phone)
        if raw_phone is None or (isinstance(raw_phone, str) and not raw_phone.strip()):
            problems.append(Problem(where, PHONE_FIELD, "is empty"))
        elif phone is None:
            problems.append(Problem(where, PHONE_FIELD, f"{_show(raw_phone)} is not a phone number "
                                    f"({MIN_PHONE_DIGITS}-{MAX_PHONE_DIGITS} digits, optional leading +)"))
        elif phone in first_seen:
            problems.append(Problem(where, PHONE_FIELD, f"{phone} is a duplicate of {first_seen[phone]}"))
        muid = fields.get(MUID_FIELD)
        if isinstance(muid, int) and not isinstance(muid, bool):
            muid = str(muid)
        if muid is not None and not isinstance(muid, str):
            problems.append(Problem(where, MUID_FIELD, "must be a string"))
        elif isinstance(muid, str):
            muid = muid.strip() or None
            if muid and len(muid) > MAX_MUID_LENGTH:
                problems.append(Problem(where, MUID_FIELD, f"is longer than {MAX_MUID_LENGTH} characters"))
        variables: dict[str, str] = {}
        for name, value in fields.items():
            if name in (PHONE_FIELD, MUID_FIELD):
                continue
            if declared is not None and name not in declared:
                problems.append(Problem(where, name, "is not a declared variable (declared: "
                                        f"{', '.join(declared) or 'none'})"))
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = json.dumps(value)
            if value is None:
                value = ""
            if not isinstance(value, str):
                problems.append(Problem(where, name, "a variable must be a string or a number"))
                continue
            variables[name] = value
        if len(problems) == before:
            first_seen[phone] = where
            destinations.append(Destination(len(destinations), line, phone, muid, variables))
        elif phone is not None and phone not in first_seen:
            first_seen[phone] = where
    if problems:
        raise InputError(problems)
    if not destinations:
        raise InputError([Problem("file", None, "has no destinations")])
    return destinations


def _show(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def read_csv(text: str, declared: tuple[str, ...] | None = None) -> list[Destination]:
    """CSV with a header: `phone` (required), `messengerUserId` (optional), every other column a variable.

    The delimiter is a comma, a semicolon or a tab (whichever the header uses); a UTF-8 BOM is ignored;
    blank lines are skipped. Header names `phone` and `messengerUserId` match in any case."""
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise InputError([Problem("file", None, "is empty")])
    header_line = text.splitlines()[0]
    delimiter = max((",", ";", "\t"), key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    names: list[str] = []
    rows: list[tuple[str, int, dict]] = []
    problems: list[Problem] = []
    last_line = 0
    try:
        for record in reader:
            line = last_line + 1                      # where this record starts
            last_line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = record
                names = _header_names(header, line, problems, declared)
                continue
            if len(record) != len(header):
                problems.append(Problem(f"line {line}", None, f"has {len(record)} fields, the header has "
                                        f"{len(header)} (a {delimiter!r} inside a value needs quotes)"))
                continue
            fields = {name: cell.strip() for name, cell in zip(names, record, strict=True)}
            rows.append((f"line {line}", line, fields))
    except csv.Error as error:
        raise InputError(problems + [Problem(f"line {reader.line_num}", None, f"is not valid CSV: {error}")]) \
            from None
    if header is None:
        raise InputError([Problem("file", None, "is empty")])
    if problems:
        raise InputError(problems)
    if not rows:
        raise InputError([Problem("file", None, "has a header but no destinations")])
    return _check_rows(rows, declared)


def _header_names(header: list[str], line: int, problems: list[Problem],
                  declared: tuple[str, ...] | None) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for column, raw in enumerate(header, start=1):
        name = raw.strip()
        if name.lower() == PHONE_FIELD.lower():
            name = PHONE_FIELD
        elif name.lower() in (MUID_FIELD.lower(), "messenger_user_id"):
            name = MUID_FIELD
        if not name:
            problems.append(Problem(f"line {line}", f"column {column}", "has no name in the header"))
        elif name in seen:
            problems.append(Problem(f"line {line}", f"column {column}", f"{name!r} appears twice in the header"))
        elif declared is not None and name not in (PHONE_FIELD, MUID_FIELD) and name not in declared:
            problems.append(Problem(f"line {line}", f"column {column}", f"{name!r} is an unknown column: "
                                    f"neither phone, messengerUserId nor a declared variable "
                                    f"({', '.join(declared) or 'none declared'})"))
        seen.add(name)
        names.append(name)
    if PHONE_FIELD not in seen:
        problems.append(Problem(f"line {line}", PHONE_FIELD, "the header has no 'phone' column "
                                f"(found: {', '.join(repr(n.strip()) for n in header)})"))
    return names


def read_json(text: str, declared: tuple[str, ...] | None = None) -> list[Destination]:
    """A JSON list of destination objects (or {"destinations": [...]}), each with `phone`, optional
    `messengerUserId`, and its variables either in a `variables` object, as flat keys, or both."""
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise InputError([Problem("file", None, "is empty")])
    try:
        document = json.loads(text)
    except ValueError as error:
        raise InputError([Problem(f"line {getattr(error, 'lineno', '?')}", None,
                                  f"is not valid JSON: {getattr(error, 'msg', error)}")]) from None
    lines = _item_lines(text) if isinstance(document, list) else None
    return destinations_from_items(document, declared, lines)


def destinations_from_items(document, declared: tuple[str, ...] | None = None,
                            lines: list[int] | None = None) -> list[Destination]:
    """Destinations from parsed JSON (a file's content, or the API's `destinations`)."""
    if isinstance(document, dict) and "destinations" in document:
        document = document["destinations"]
        lines = None
    if not isinstance(document, list):
        raise InputError([Problem("file", None, "must be a JSON list of destinations "
                                  '(or an object with a "destinations" list)')])
    if not document:
        raise InputError([Problem("file", None, "has no destinations")])
    rows, problems = [], []
    for number, item in enumerate(document, start=1):
        line = lines[number - 1] if lines else number
        where = f"line {line} (item {number})" if lines else f"item {number}"
        if not isinstance(item, dict):
            problems.append(Problem(where, None, "must be an object with a phone"))
            continue
        fields = {k: v for k, v in item.items() if k != VARIABLES_FIELD}
        nested = item.get(VARIABLES_FIELD)
        if nested is not None and not isinstance(nested, dict):
            problems.append(Problem(where, VARIABLES_FIELD, "must be an object"))
            continue
        for name, value in (nested or {}).items():
            if name in (PHONE_FIELD, MUID_FIELD):
                problems.append(Problem(where, f"{VARIABLES_FIELD}.{name}",
                                        f"{name!r} cannot be a variable name"))
                continue
            if name in fields:
                problems.append(Problem(where, f"{VARIABLES_FIELD}.{name}",
                                        f"is also given as the key {name!r}: keep one"))
            fields[name] = value
        rows.append((where, line, fields))
    if problems:
        raise InputError(problems)
    return _check_rows(rows, declared)


def _item_lines(text: str) -> list[int] | None:
    """The line on which each item of a top-level JSON array starts."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    lines = []
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return lines
        lines.append(text.count("\n", 0, position) + 1)
        try:
            _, position = decoder.raw_decode(text, position)
        except ValueError:
            return None


def read_destinations(path: str | Path, declared: tuple[str, ...] | None = None,
                      fmt: str | None = None) -> list[Destination]:
    """Read a CSV or JSON file (by its extension unless `fmt` says)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError([Problem(str(path), None, f"cannot be read: {error.strerror or error}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError([Problem(f"line {line}", None, "is not UTF-8 text (save the file as UTF-8)")]) \
            from None
    fmt = (fmt or ("json" if path.suffix.lower() == ".json" else "csv")).lower()
    if fmt == "json":
        return read_json(text, declared)
    return read_csv(text, declared)


def load_config(path: str | Path) -> dict:
    """Chat settings from a small JSON, TOML or INI file (INI: a [chat] section, or the first one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise InputError([Problem(str(path), None, f"cannot be read: {error.strerror or error}")]) from None
    except UnicodeDecodeError:
        raise InputError([Problem(str(path), None, "is not UTF-8 text")]) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            config = tomllib.loads(text)
        elif suffix in (".ini", ".cfg"):
            parser = configparser.ConfigParser(interpolation=None)
            parser.optionxform = str                      # keep chatId's case
            parser.read_string(text)
            section = "chat" if parser.has_section("chat") else (parser.sections() or [None])[0]
            config = dict(parser[section]) if section else {}
            if "variables" in config:
                config["variables"] = [v.strip() for v in config["variables"].split(",") if v.strip()]
        else:
            config = json.loads(text)
    except (ValueError, configparser.Error) as error:
        raise InputError([Problem(str(path), None, f"cannot be parsed: {error}")]) from None
    if isinstance(config, dict) and isinstance(config.get("chat"), dict) and suffix != ".ini":
        # TWIN's own shape is fine too: {"chat": {...}, "callbackData": "..."}
        config = {**config["chat"], **{k: v for k, v in config.items() if k != "chat"}}
    if not isinstance(config, dict):
        raise InputError([Problem(str(path), None, "must hold an object of chat settings")])
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InputError([Problem(str(path), name, f"is not a chat setting (known: {', '.join(CONFIG_KEYS)})")
                          for name in unknown])
    return config


def chat_settings(values: dict, where: str = "chat settings") -> ChatSettings:
    """Check the chat settings (TWIN's names: chatId, botId, ...); every problem names the setting."""
    problems: list[Problem] = []
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    for name in unknown:
        problems.append(Problem(where, name, f"is not a chat setting (known: {', '.join(CONFIG_KEYS)})"))
    found: dict[str, Any] = {}
    for name, option, required, default in CHAT_FIELDS:
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            value = default
        if value is None:
            if required:
                problems.append(Problem(where, name, f"is missing (give {option} or put {name} in --config)"))
            continue
        if not isinstance(value, str):
            problems.append(Problem(where, name, "must be a string"))
            continue
        found[name] = value.strip() if name != "text" else value
    callback_data = values.get("callbackData")
    if callback_data is not None and not isinstance(callback_data, str):
        problems.append(Problem(where, "callbackData", "must be a string"))
    declared = values.get("variables")
    if declared is not None:
        if isinstance(declared, str):
            declared = [v.strip() for v in declared.split(",") if v.strip()]
        if not isinstance(declared, list) or not all(isinstance(v, str) and v for v in declared):
            problems.append(Problem(where, "variables", "must be a list of variable names"))
            declared = None
        else:
            declared = tuple(declared)
    if problems:
        raise InputError(problems)
    return ChatSettings(
        chat_id=found["chatId"], bot_id=found["botId"], text=found["text"],
        messenger_type=found["messengerType"].upper(), provider=found["provider"],
        chat_session_name=found.get("chatSessionName"), callback_data=callback_data or None,
        variables=declared)


# ------------------------------------------------------------------------------------------ sending
class SendInProgress(RuntimeError):
    """Another process is sending this mailing right now."""

    def __init__(self, send_id: int, until: dt.datetime | None):
        self.send_id, self.until = send_id, until
        when = f" (its claim runs until {until:%Y-%m-%d %H:%M:%S} UTC)" if until else ""
        super().__init__(f"send #{send_id} is already being sent by another process{when}")


@dataclass
class RowOutcome:
    index: int
    line: int
    phone: str
    state: str
    message_id: str | None = None
    error: str | None = None
    batch: int | None = None
    earlier: bool = False        # its state comes from an earlier run (not this one)

    def as_json(self) -> dict:
        return {"index": self.index, "line": self.line, "phone": self.phone, "state": self.state,
                "messageId": self.message_id, "error": self.error, "batch": self.batch,
                "fromEarlierRun": self.earlier}


@dataclass
class SendReport:
    send_id: int | None
    key: str
    rows: list[RowOutcome]                       # this run's destinations, in file order
    failure: str | None = None                   # why the run stopped, if it did
    failure_kind: str | None = None              # rejected / not_taken / unknown
    dry_run: bool = False
    resend_unknown: bool = False
    batches_sent: int = 0
    elsewhere: dict[str, int] = field(default_factory=dict)   # rows of the send not in this input
    overlap: dict[int, int] = field(default_factory=dict)     # other send id -> phones it already sent

    def by_state(self, state: str, *, earlier: bool | None = None) -> list[RowOutcome]:
        return [r for r in self.rows if r.state == state and (earlier is None or r.earlier == earlier)]

    @property
    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in STATES if state != IN_FLIGHT}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    @property
    def complete(self) -> bool:
        return all(row.state == SENT for row in self.rows)

    def as_json(self) -> dict:
        return {"send": {"id": self.send_id, "key": self.key}, "complete": self.complete,
                "dryRun": self.dry_run, "counts": self.counts, "failure": self.failure,
                "failureKind": self.failure_kind,
                "alreadySentByOtherSends": {str(k): v for k, v in self.overlap.items()},
                "rows": [r.as_json() for r in self.rows]}


class Sender:
    """Sends one mailing: records it, sends the rows that may be sent, in batches, and reports."""

    def __init__(self, settings, chat: ChatSettings, *, callback_url: str, client=None,
                 batch_size: int | None = None, resend_unknown: bool = False, source: str | None = None,
                 progress: Callable[[int], None] | None = None):
        self.settings = settings
        self.chat = chat
        self.callback_url = callback_url
        self._client = client
        self.batch_size = batch_size or settings.send_batch_size
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.resend_unknown = resend_unknown
        self.source = source
        self.progress = progress or (lambda n: None)
        self.owner = uuid.uuid4().hex
        timeouts = settings.twin24_connect_timeout + settings.twin24_read_timeout
        # Longer than one send with every retry the client may make; renewed before each batch.
        self.lease = dt.timedelta(seconds=timeouts * (settings.twin24_retries + 2)
                                  + settings.twin24_max_retry_wait * settings.twin24_retries + 60)

    @property
    def client(self):
        if self._client is None:
            from . import metrics
            from .twin24 import TwinClient

            def on_call(endpoint: str, outcome: str) -> None:
                metrics.TWIN_CALLS.labels(endpoint=endpoint, outcome=outcome).inc()
            self._client = TwinClient(self.settings, on_call=on_call)
        return self._client

    # ---- the plan (no writes) --------------------------------------------------------------------
    def plan(self, destinations: list[Destination]) -> SendReport:
        """What a run would do, without writing or sending: rows to send, rows already done."""
        send = Send.get_or_none(Send.key == self.chat.key)
        existing = {} if send is None else {r.phone: r for r in Outbox.select().where(Outbox.send == send.id)}
        rows = []
        for d in destinations:
            row = existing.get(d.phone)
            state = row.state if row is not None else PENDING
            if state == IN_FLIGHT:
                state = UNKNOWN
            rows.append(RowOutcome(d.index, d.line, d.phone, state, row.message_id if row else None,
                                   row.error if row else None, row.batch if row else None,
                                   earlier=row is not None and state not in SENDABLE))
        return SendReport(send.id if send else None, self.chat.key, rows, dry_run=True,
                          resend_unknown=self.resend_unknown,
                          overlap=self.overlap(send.id if send else None, destinations))

    def overlap(self, send_id: int | None, destinations: list[Destination]) -> dict[int, int]:
        """Phones of this input that OTHER sends with the same callbackData already sent (or may have):
        usually the same mailing with its text or chat settings changed half-way. A warning, not a stop."""
        if self.chat.callback_data is None:
            return {}
        phones = [d.phone for d in destinations]
        found: Counter = Counter()
        for start in range(0, len(phones), 500):
            query = (Outbox.select(Outbox.send).join(Send, on=(Outbox.send == Send.id))
                     .where((Send.callback_data == self.chat.callback_data)
                            & (Outbox.state.in_((SENT, UNKNOWN, IN_FLIGHT)))
                            & (Outbox.phone.in_(phones[start:start + 500]))))
            if send_id is not None:
                query = query.where(Send.id != send_id)
            found.update(send for (send,) in query.tuples())
        return dict(found)

    def to_send(self, report: SendReport) -> list[RowOutcome]:
        wanted = SENDABLE + ((UNKNOWN,) if self.resend_unknown else ())
        return [r for r in report.rows if r.state in wanted]

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, destinations: list[Destination]) -> SendReport:
        send = self._send_row(len(destinations))
        self._claim(send)
        try:
            rows = self._record(send, destinations)
            report = SendReport(send.id, send.key, [], resend_unknown=self.resend_unknown)
            wanted = SENDABLE + ((UNKNOWN,) if self.resend_unknown else ())
            work = [row for row in rows if row.state in wanted]
            for start in range(0, len(work), self.batch_size):
                batch = work[start:start + self.batch_size]
                stopped = self._send_batch(send, batch, report)
                self.progress(len(batch))
                if stopped:
                    break
            report.rows = self._outcomes(send, destinations, {row.id for row in work})
            report.elsewhere = self._elsewhere(send, destinations)
            report.overlap = self.overlap(send.id, destinations)
            return report
        finally:
            self._release(send)

    def _send_row(self, total: int) -> Send:
        now = utcnow()
        with db.atomic():
            Send.insert(key=self.chat.key, created_at=now, updated_at=now, source=self.source,
                        chat=json.dumps(self.chat.chat_json(), ensure_ascii=False),
                        callback_data=self.chat.callback_data, total=0,
                        ).on_conflict_ignore().execute()
        return Send.get(Send.key == self.chat.key)

    def _claim(self, send: Send) -> None:
        now = utcnow()
        claimed = (Send.update(lease_owner=self.owner, lease_until=now + self.lease, updated_at=now)
                   .where((Send.id == send.id) & ((Send.lease_until.is_null()) | (Send.lease_until < now)
                                                  | (Send.lease_owner == self.owner)))
                   .execute())
        if not claimed:
            raise SendInProgress(send.id, Send.get_by_id(send.id).lease_until)

    def _renew(self, send: Send) -> None:
        now = utcnow()
        Send.update(lease_until=now + self.lease, updated_at=now).where(
            (Send.id == send.id) & (Send.lease_owner == self.owner)).execute()

    def _release(self, send: Send) -> None:
        try:
            Send.update(lease_owner=None, lease_until=None, updated_at=utcnow()).where(
                (Send.id == send.id) & (Send.lease_owner == self.owner)).execute()
        except Exception:   # the lease expires by itself; never hide the real error behind this one
            log.exception("could not release the claim on send #%s", send.id)

    def _record(self, send: Send, destinations: list[Destination]) -> list[Outbox]:
        """Record this run's rows (new phones added; unsent rows refreshed from the input) and turn rows
        left in flight by a run that died into `unknown`. Returns this input's rows in input order."""
        now = utcnow()
        with db.atomic():
            (Outbox.update(state=UNKNOWN, updated_at=now,
                           error="the run sending it stopped while the request was out: TWIN may have "
                                 "taken it")
             .where((Outbox.send == send.id) & (Outbox.state == IN_FLIGHT)).execute())
            existing = {row.phone: row for row in Outbox.select().where(Outbox.send == send.id)}
            new = []
            for d in destinations:
                row = existing.get(d.phone)
                fields = dict(row_index=d.index, line=d.line, messenger_user_id=d.messenger_user_id,
                              variables=json.dumps(d.variables, ensure_ascii=False) if d.variables else None)
                if row is None:
                    new.append(dict(send=send.id, phone=d.phone, state=PENDING, updated_at=now, **fields))
                elif row.state in SENDABLE + (UNKNOWN,) and any(getattr(row, k) != v for k, v in fields.items()):
                    Outbox.update(updated_at=now, **fields).where(Outbox.id == row.id).execute()
            for start in range(0, len(new), 200):
                Outbox.insert_many(new[start:start + 200]).execute()
            total = Outbox.select().where(Outbox.send == send.id).count()
            Send.update(total=total, updated_at=now, source=self.source or Send.source).where(
                Send.id == send.id).execute()
        phones = [d.phone for d in destinations]
        by_phone = {row.phone: row for row in Outbox.select().where(Outbox.send == send.id)}
        return [by_phone[p] for p in phones]

    def _send_batch(self, send: Send, batch: list[Outbox], report: SendReport) -> bool:
        """Send one batch; True if the run must stop here."""
        from .twin24 import SendNotTaken, SendOutcomeUnknown, SendRejected, TwinAuthError
        self._renew(send)
        ids = [row.id for row in batch]
        with db.atomic():
            number = (Send.select(Send.batches).where(Send.id == send.id).scalar() or 0) + 1
            Send.update(batches=number, updated_at=utcnow()).where(Send.id == send.id).execute()
            self._mark(ids, IN_FLIGHT, batch=number, attempts=Outbox.attempts + 1, error=None)
        payload = {"messages": [{
            "channels": {"chat": self.chat.chat_json()},
            "callbackUrl": self.callback_url,
            **({"callbackData": self.chat.callback_data} if self.chat.callback_data is not None else {}),
            "destinations": [_destination_payload(row) for row in batch],
        }]}
        try:
            answer = self.client.send(payload)
        except SendRejected as error:
            self._fail(report, ids, REJECTED, f"TWIN refused the request: {error.detail}")
            return True
        except (SendNotTaken, TwinAuthError) as error:
            self._fail(report, ids, NOT_TAKEN, f"did not reach TWIN: {error.detail}")
            return True
        except SendOutcomeUnknown as error:
            self._fail(report, ids, UNKNOWN, f"outcome unknown, TWIN may have taken it: {error.detail}")
            return True
        except BaseException as error:
            # A bug, Ctrl-C, a failed token fetch...: the request may have gone out.
            self._fail(report, ids, UNKNOWN, f"interrupted while the request was out ({type(error).__name__})")
            raise
        if len(answer) != len(batch):
            self._fail(report, ids, UNKNOWN, f"TWIN answered {len(answer)} items for {len(batch)} "
                                             "destinations: ids cannot be matched to phones")
            return True
        self._store_answer(send, batch, answer, number)
        report.batches_sent += 1
        return any(not isinstance(item.get("id"), str) or not item.get("id") for item in answer)

    def _fail(self, report: SendReport, ids: list[int], state: str, reason: str) -> None:
        report.failure, report.failure_kind = reason, state
        try:
            with db.atomic():
                self._mark(ids, state, error=reason[:2000])
        except Exception:
            # Rows stay in_flight; the next run turns them into `unknown` (never into sendable).
            log.exception("could not record the outcome of a batch (%s)", state)
            raise

    @staticmethod
    def _mark(ids: list[int], state: str, **extra) -> None:
        for start in range(0, len(ids), 500):
            Outbox.update(state=state, updated_at=utcnow(), **extra).where(
                Outbox.id.in_(ids[start:start + 500])).execute()

    def _store_answer(self, send: Send, batch: list[Outbox], answer: list[dict], number: int) -> None:
        """Rows sent with their ids (by position: TWIN answers in destination order), and the message rows."""
        now = utcnow()
        with db.atomic():
            for row, item in zip(batch, answer, strict=True):
                message_id = item.get("id")
                error = item.get("error")
                error = None if error in (None, "") else (error if isinstance(error, str)
                                                          else json.dumps(error, ensure_ascii=False))
                if not isinstance(message_id, str) or not message_id:
                    state = REJECTED if error else UNKNOWN
                    Outbox.update(state=state, updated_at=now, error=error or "TWIN's answer has no id for "
                                  "this destination").where(Outbox.id == row.id).execute()
                    continue
                Outbox.update(state=SENT, message_id=message_id, updated_at=now, error=error).where(
                    Outbox.id == row.id).execute()
                self._upsert_message(send, row, item, message_id, now)

    def _upsert_message(self, send, row: Outbox, item: dict, message_id: str, now) -> None:
        status = item.get("status") if isinstance(item.get("status"), str) and item.get("status") else "CREATED"
        status = status.upper()[:64]
        ours = {"phone": row.phone, "messenger_user_id": row.messenger_user_id, "variables": row.variables,
                "destination_index": row.row_index, "send_id": send.id, "sent_at": now}
        identity = {"callback_data": self.chat.callback_data, "bulk_id": _id_text(item.get("bulkId")),
                    "group_id": _id_text(item.get("groupId")), "flow_id": _id_text(item.get("flowId"))}
        # A callback may have raced ahead of this answer: then the row exists, and only moves forward.
        update = forward_update(status, None, now, self.settings)
        update.update({getattr(Message, name): value for name, value in ours.items()})
        update.update({getattr(Message, name): fn.COALESCE(getattr(Message, name), value)
                       for name, value in identity.items() if value is not None})
        Message.insert(id=message_id, **ours, **identity,
                       **new_message_fields(status, None, now, self.settings),
                       ).on_conflict(conflict_target=[Message.id], update=update).execute()

    def _outcomes(self, send: Send, destinations: list[Destination], touched: set[int]) -> list[RowOutcome]:
        by_phone = {row.phone: row for row in Outbox.select().where(Outbox.send == send.id)}
        outcomes = []
        for d in destinations:
            row = by_phone[d.phone]
            outcomes.append(RowOutcome(d.index, d.line, d.phone, row.state, row.message_id, row.error,
                                       row.batch, earlier=row.id not in touched))
        return outcomes

    def _elsewhere(self, send: Send, destinations: list[Destination]) -> dict[str, int]:
        """Rows of this mailing recorded by earlier runs whose phone is not in this input, by state."""
        phones = {d.phone for d in destinations}
        counts: dict[str, int] = {}
        for phone, state in Outbox.select(Outbox.phone, Outbox.state).where(Outbox.send == send.id).tuples():
            if phone not in phones:
                counts[state] = counts.get(state, 0) + 1
        return counts


def _destination_payload(row: Outbox) -> dict:
    item: dict[str, Any] = {"phone": row.phone}
    if row.messenger_user_id:
        item["messengerUserId"] = row.messenger_user_id
    if row.variables:
        item["variables"] = json.loads(row.variables)
    return item


def _id_text(value) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return json.dumps(value)
    return value[:128] if isinstance(value, str) and value else None


# ------------------------------------------------------------------------------------------ reports
def line_ranges(lines: Iterable[int]) -> str:
    """'2-5, 9, 11-12' for [2, 3, 4, 5, 9, 11, 12]."""
    parts: list[str] = []
    ordered = sorted(set(lines))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(parts)


def summary_lines(report: SendReport, noun: str = "lines") -> list[str]:
    """The human summary of a run (the CLI prints it)."""
    out = []
    title = "dry run" if report.dry_run else f"send #{report.send_id}"
    out.append(f"{title}: {len(report.rows)} destinations, mailing key {report.key[:12]}")
    for other, count in sorted(report.overlap.items()):
        out.append(f"  warning: {count} of these phones were already sent by send #{other}, which has the "
                   "same callbackData but other chat settings (text?)")

    def group(label: str, rows: list[RowOutcome], note: str = "") -> None:
        if rows:
            out.append(f"  {label:<22}{len(rows):>7}  ({noun} {line_ranges(r.line for r in rows)}){note}")

    if report.dry_run:
        sendable = [r for r in report.rows if r.state in SENDABLE]
        group("would be sent:", sendable)
        group("already sent:", report.by_state(SENT))
        group("unknown outcome:", report.by_state(UNKNOWN),
              "  would be resent (--resend-unknown)" if report.resend_unknown else "  not resent")
        return out
    group("sent now:", report.by_state(SENT, earlier=False))
    group("sent earlier:", report.by_state(SENT, earlier=True), "  not sent again")
    rejected = report.by_state(REJECTED)
    group("rejected by TWIN:", rejected, "  safe to fix and rerun")
    for reason in sorted({r.error or "" for r in rejected})[:5]:
        out.append(f"      reason: {reason}")
    group("unknown outcome:", report.by_state(UNKNOWN),
          "  TWIN may have taken them: NOT resent (see docs/sending.md)")
    not_sent = report.by_state(NOT_TAKEN) + report.by_state(PENDING)
    group("not sent:", not_sent, "  a rerun sends them")
    if report.failure:
        out.append(f"  stopped: {report.failure}")
    if report.elsewhere:
        parts = ", ".join(f"{n} {state}" for state, n in sorted(report.elsewhere.items()))
        out.append(f"  rows of earlier runs not in this input (left as they are): {parts}")
    return out
