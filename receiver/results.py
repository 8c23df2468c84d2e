"""Reading the results: one query with its filters, keyset pages, flat rows, CSV and JSON streams.

The CLI export, the API and the results page all read through here, so a filter or a column means the
same thing everywhere. Rules: pages and streams walk keyset pages on (first_seen_at, message id), never
OFFSET; a stream reads one chunk (CHUNK rows) whole and holds no cursor or read transaction open while
the client reads; a `Tally` adds up, so stored per-mailing tallies sum to the tally of all messages; CSV
cells are defused unless `raw`. What each column, filter and format means: docs/results.md.
"""
from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring as encode_json_string

from peewee import Case, SqliteDatabase, Tuple, fn

from .db import db
from .models import RESULTS_COLUMNS, STAGES, Message, callback_data_is
from .status import FAILED_STATUSES

# Output columns, in the exports' documented order (docs/results.md): the `results` view's columns but
# `result`, which comes after them with its fields; each reads the Message field the view reads.
COLUMN_NAMES = ("message_id", "callback_data", "bulk_id", "phone", "destination_index", "status", "status_code",
                "stage", "given_up_reason", "chat_id", "session_status", "bot_status", "first_seen_at",
                "delivered_at", "chat_id_at", "result_at", "last_seen_at")
assert {*COLUMN_NAMES, "result"} == RESULTS_COLUMNS.keys(), "the exports give every column of the view"
COLUMNS = tuple((name, RESULTS_COLUMNS[name]) for name in COLUMN_NAMES)
RESULT_PREFIX = "result."
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CHUNK = 5000                       # rows per keyset chunk (and per piece of text) when streaming
KEEP_ALIVE_RESULTS = 1000          # distinct results parsed between two keep_alive calls
EXCEL_BOM = "\ufeff"
# Well above the longest cursor encode_cursor gives out (about 2,100 characters: a 128-character id
# of characters JSON escapes as surrogate pairs).
MAX_CURSOR = 4096
# Parameter names of the HTTP API (the same names as TWIN's callback fields where there is one).
PARAMS = ("callbackData", "bulkId", "status", "stage", "since", "until")
ANSWER_VALUES = 12                 # values shown per answer chart; the rest are summed as "other"
# An answer that reads as a number, e.g. the recipe's "nps": "7": such answers are charted in numeric order.
NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")


class FilterError(ValueError):
    """A filter or cursor that cannot be used; `param` names it."""

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param}: {detail}")
        self.param, self.detail = param, detail


@dataclass(frozen=True)
class Filters:
    """What to read. Empty means everything. `since` is inclusive, `until` exclusive, both on
    first_seen_at (when the receiver first heard of the message), in UTC."""
    callback_data: str | None = None
    bulk_id: str | None = None
    status: tuple[str, ...] = ()
    stage: tuple[str, ...] = ()
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    @classmethod
    def build(cls, callback_data=None, bulk_id=None, status: Iterable[str] = (), stage: Iterable[str] = (),
              since=None, until=None) -> Filters:
        """Filters from loose values (strings as people type them); FilterError names a bad one."""
        statuses = tuple(dict.fromkeys(s.strip().upper() for s in _split(status) if s.strip()))
        stages = tuple(dict.fromkeys(s.strip().lower() for s in _split(stage) if s.strip()))
        for name in stages:
            if name not in STAGES:
                raise FilterError("stage", f"unknown stage {name!r}; one of {', '.join(STAGES)}")
        since_at = parse_time("since", since) if isinstance(since, str) else since
        until_at = parse_time("until", until) if isinstance(until, str) else until
        if since_at and until_at and since_at >= until_at:
            raise FilterError("until", "must be after since")
        return cls(callback_data=callback_data or None, bulk_id=bulk_id or None, status=statuses,
                   stage=stages, since=since_at, until=until_at)

    @classmethod
    def from_args(cls, args, allowed: Iterable[str] = ()) -> Filters:
        """Filters from request arguments (a werkzeug MultiDict). Unknown arguments are an error:
        a misspelt filter must not silently return everything."""
        known = set(PARAMS) | set(allowed)
        for name in args.keys():
            if name not in known:
                raise FilterError(name, f"unknown parameter; known: {', '.join(sorted(known))}")
            if any("\x00" in value for value in args.getlist(name)):
                # Nothing stored holds one, and PostgreSQL refuses to compare with one (a 500).
                raise FilterError(name, "contains a NUL character")
        return cls.build(
            callback_data=args.get("callbackData"), bulk_id=args.get("bulkId"),
            status=args.getlist("status"), stage=args.getlist("stage"),
            since=args.get("since") or None, until=args.get("until") or None)

    def to_args(self) -> dict:
        """The HTTP arguments that give these filters back (for links)."""
        args = {"callbackData": self.callback_data, "bulkId": self.bulk_id,
                "status": ",".join(self.status) or None, "stage": ",".join(self.stage) or None,
                "since": iso(self.since), "until": iso(self.until)}
        return {k: v for k, v in args.items() if v is not None}

    def mailing_only(self) -> Filters:
        return Filters(callback_data=self.callback_data, bulk_id=self.bulk_id)

    def where(self, query):
        if self.callback_data is not None:
            query = query.where(callback_data_is(self.callback_data))
        if self.bulk_id is not None:
            query = query.where(Message.bulk_id == self.bulk_id)
        if self.status:
            query = query.where(Message.status.in_(list(self.status)))
        if self.stage:
            query = query.where(Message.stage.in_(list(self.stage)))
        if self.since is not None:
            query = query.where(Message.first_seen_at >= self.since)
        if self.until is not None:
            query = query.where(Message.first_seen_at < self.until)
        return query


def _split(values) -> list[str]:
    """`status=A,B` and `status=A&status=B` mean the same."""
    if isinstance(values, str):
        values = [values]
    return [part for value in values for part in value.split(",")]


def parse_time(param: str, text: str) -> dt.datetime:
    """ISO 8601 date or date-time; without an offset it is UTC. Returns naive UTC, like the columns."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise FilterError(param, f"expected an ISO 8601 date or date-time, got {text!r}") from None
    if value.tzinfo is not None:
        try:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        except OverflowError:       # 0001-01-01T00:00+01:00 is in year 0 in UTC, which datetime lacks
            raise FilterError(param, f"{text!r} is outside the years 1 to 9999 in UTC") from None
    return value


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


# ---- cursors ------------------------------------------------------------------------------------

def encode_cursor(row: Mapping) -> str:
    key = json.dumps([row["first_seen_at"].isoformat(), row["id"]], separators=(",", ":"))
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[dt.datetime, str]:
    """The key a cursor names; FilterError for anything encode_cursor could not have given out.

    A cursor comes from outside: a crafted one (garbage, deeply nested JSON, a NUL that PostgreSQL
    refuses, a time with an offset) must be a 400, never a 500.
    """
    if len(token) > MAX_CURSOR:
        raise FilterError("cursor", f"longer than any cursor this API gives out ({MAX_CURSOR} characters)")
    try:
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise FilterError("cursor", "not a cursor this API gave out") from None
    if not (isinstance(key, list) and len(key) == 2 and all(isinstance(part, str) for part in key)):
        raise FilterError("cursor", "not a cursor this API gave out")
    first_seen, message_id = key
    try:
        at = dt.datetime.fromisoformat(first_seen)
    except ValueError:
        raise FilterError("cursor", "not a cursor this API gave out") from None
    if at.tzinfo is not None or "\x00" in message_id or len(message_id) > Message.id.max_length:
        raise FilterError("cursor", "not a cursor this API gave out")
    return at, message_id


# ---- reading ------------------------------------------------------------------------------------

def _select(filters: Filters, after: tuple[dt.datetime, str] | None, limit: int):
    query = filters.where(Message.select(*(f for _, f in COLUMNS), Message.result))
    if after is not None:
        query = query.where(Tuple(Message.first_seen_at, Message.id) > Tuple(*after))
    return query.order_by(Message.first_seen_at, Message.id).limit(limit)


@dataclass
class Page:
    rows: list[dict]
    next_cursor: str | None


def page(filters: Filters, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
    """One page of raw rows (Message field names) after `cursor`; next_cursor is None on the last."""
    after = decode_cursor(cursor) if cursor else None
    rows = list(_select(filters, after, limit + 1).dicts().iterator())
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1]) if more else None)


def iterate(filters: Filters, chunk: int = CHUNK) -> Iterator[dict]:
    """Every matching raw row, in order, one keyset chunk at a time.

    Each chunk is read whole (`.iterator()`, so peewee keeps no second copy) before any of it is
    yielded: no cursor or read transaction stays open while a slow client takes the rows, and a
    connection closed between chunks is simply reopened for the next one.
    """
    after = None
    while True:
        rows = list(_select(filters, after, chunk).dicts().iterator())
        yield from rows
        if len(rows) < chunk:
            return
        after = (rows[-1]["first_seen_at"], rows[-1]["id"])


def result_counts(filters: Filters) -> Iterator[tuple[str | None, int]]:
    """(result text, number of messages) for each distinct result among the matching rows."""
    query = filters.where(Message.select(Message.result, fn.COUNT(Message.id)))
    return query.group_by(Message.result).tuples().iterator()


def parse_result(text: str | None):
    """The stored result as JSON, or the text itself if it is not JSON."""
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def empty(value) -> bool:
    """null, "", {} and []: a value that says nothing (false and 0 do say something)."""
    return value is None or (isinstance(value, (str, dict, list)) and not value)


def result_fields(value) -> dict:
    """The bot's result as flat fields: nested objects become `key.sub` (at any depth); a result that is
    not an object is the one field `result`; empty values are left out. Where a key written with a dot
    meets the same path through nesting, the first one met is kept."""
    fields: dict = {}
    _flatten(value if isinstance(value, dict) else {"result": value}, "", fields)
    return fields


def _flatten(value: dict, prefix: str, out: dict) -> None:
    for key, item in value.items():
        path = prefix + str(key)
        if isinstance(item, dict):
            _flatten(item, path + ".", out)
        elif not empty(item):
            out.setdefault(path, item)


def result_keys(filters: Filters, keep_alive: Callable[[], None] = lambda: None) -> list[str]:
    """The fields of the bot's results among the matching rows, most common first (ties by name).
    `keep_alive` is called every KEEP_ALIVE_RESULTS distinct results (see csv_stream)."""
    seen: Counter = Counter()
    for n, (text, count) in enumerate(result_counts(filters), 1):
        for key in result_fields(parse_result(text)):
            seen[key] += count
        if n % KEEP_ALIVE_RESULTS == 0:
            keep_alive()
    return _by_frequency(seen)


def _by_frequency(counts: Counter) -> list[str]:
    return sorted(counts, key=lambda key: (-counts[key], key))


# ---- shaping rows -------------------------------------------------------------------------------

def _base(row: Mapping) -> dict:
    out = {}
    for name, f in COLUMNS:
        value = row[f.name]
        out[name] = iso(value) if isinstance(value, dt.datetime) else value
    return out


def row_json(row: Mapping) -> dict:
    """A row for JSON: the columns, with `result` as the bot's JSON object."""
    out = _base(row)
    out["result"] = parse_result(row["result"])
    return out


def cell(value) -> str:
    """A value as CSV or chart text: strings as they are, null empty, anything else as JSON text
    (so booleans are `true`/`false` everywhere, and 7 and "7" read the same)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def flat_row(row: Mapping, keys: Iterable[str]) -> dict:
    """A row for CSV: the columns, `result` as stored, and `result.<field>` for each field asked for
    (see result_fields). Lists are JSON text."""
    out = _base(row)
    out["result"] = row["result"]
    fields = result_fields(parse_result(row["result"]))
    for key in keys:
        out[RESULT_PREFIX + key] = fields.get(key)
    return {k: cell(v) for k, v in out.items()}


# ---- streams ------------------------------------------------------------------------------------

def csv_header(keys: Iterable[str]) -> list[str]:
    return [*COLUMN_NAMES, "result", *(RESULT_PREFIX + key for key in keys)]


# A cell starting with one of these is run as a formula by Excel, LibreOffice or Google Sheets
# (=HYPERLINK(...) leaks data, =cmd|... starts programs): OWASP's list (= + - @ tab CR), and to be
# safe line feed, NUL (ASVS lists it) and the full-width forms of the four, which IMEs type.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\0", "\uff1d", "\uff0b", "\uff0d", "\uff20")
# A cell that is only a number (-5, +79991234567, -2.5e3) is read as that number, never as a formula.
PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def defuse(text: str) -> str:
    """A cell a spreadsheet would run as a formula, with a leading apostrophe: the spreadsheet shows it
    as text (OWASP's advice). Plain numbers stay as they are."""
    if text.startswith(FORMULA_STARTS) and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_stream(filters: Filters, excel: bool = False, raw: bool = False, chunk: int = CHUNK,
               keep_alive: Callable[[], None] = lambda: None, keys: list[str] | None = None,
               on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[str]:
    """The matching rows as CSV text (RFC 4180 quoting, CRLF line ends), one piece per keyset chunk.

    Cells a spreadsheet would run as formulas are defused (see `defuse`) unless raw=True: the values
    as stored, for programs. excel=True starts with a UTF-8 byte order mark, so that Excel reads
    Cyrillic right. `keys`: the result.<field> columns (default: found by a first pass, result_keys).
    `keep_alive` is called between pieces: under gunicorn it tells the master that this worker is
    making progress, so a long export is not killed by the timeout (api.stream_response); `on_rows`
    gets the number of rows of each piece (the CLI's progress bar).
    """
    keys = result_keys(filters, keep_alive) if keys is None else keys
    header = csv_header(keys)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    yield (EXCEL_BOM if excel else "") + _drain(buffer)
    shape = _CsvRows(keys, raw)
    for rows in _chunks(filters, chunk):
        keep_alive()
        on_rows(len(rows))
        yield shape.text(rows)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _dumps(document) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def jsonl_stream(filters: Filters, chunk: int = CHUNK, keep_alive: Callable[[], None] = lambda: None,
                 on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[str]:
    """One JSON object per line."""
    shape = _JsonRows()
    for rows in _chunks(filters, chunk):
        keep_alive()
        on_rows(len(rows))
        yield "\n".join(shape.texts(rows)) + "\n"


def json_stream(filters: Filters, chunk: int = CHUNK, keep_alive: Callable[[], None] = lambda: None,
                on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[str]:
    """One JSON array, written as it is read: a download cut short lacks its closing `]`."""
    yield "["
    separator = "\n"
    shape = _JsonRows()
    for rows in _chunks(filters, chunk):
        keep_alive()
        on_rows(len(rows))
        yield separator + ",\n".join(shape.texts(rows))
        separator = ",\n"
    yield "\n]\n"


# ---- streams: rows as the cursor gives them -------------------------------------------------------
# A stream reads tuples straight from the database cursor and shapes each chunk column by column, since
# most columns need nothing done (no null, nothing to quote, nothing a spreadsheet would run), which
# one look over a column's joined text tells. Then each row is one `%` of a format string (the same
# text csv.writer and json.dumps would give), and each distinct result is parsed and written once
# (ResultCache), since a mailing's results repeat: no dict per row, no per-cell call where a column
# needs none. On SQLite the timestamps come as text ("2025-03-01 10:15:02.123456", as peewee stores
# them) and become ISO 8601 by replacing the space; PostgreSQL writes them as ISO text itself
# (_iso_in_sql). On SQLite the result comes as bytes: decoding it row by row into a str costs more than
# reading all the other columns.

TIME_POSITIONS = tuple(i for i, (_, f) in enumerate(COLUMNS) if f.field_type == "DATETIME")
TEXT_POSITIONS = tuple(i for i, (_, f) in enumerate(COLUMNS) if f.field_type in ("VARCHAR", "TEXT"))
KEY_POSITIONS = (COLUMN_NAMES.index("first_seen_at"), COLUMN_NAMES.index("message_id"))
RESULT_CACHE = 20_000       # distinct results kept per stream
SEPARATOR = "\x1f"          # joins a column's cells, to look over them at once; it starts no formula
# A cell holding one of these is quoted (RFC 4180, as csv.writer does).
CSV_QUOTED = (",", '"', "\r", "\n")
NEEDS_QUOTES = re.compile("[" + re.escape("".join(CSV_QUOTED)) + "]")
# A cell of a column joined with SEPARATOR (led by it) that starts like a formula.
STARTS_FORMULA = re.compile(re.escape(SEPARATOR) + "[" + re.escape("".join(FORMULA_STARTS)) + "]")
CSV_LINE = ",".join(["%s"] * len(COLUMNS)) + "%s"        # the columns, then the result's cells: ",...\r\n"
JSON_OBJECT = "{" + "".join(f'"{name}":%s,' for name in COLUMN_NAMES) + '"result":%s}'


def _chunks(filters: Filters, chunk: int) -> Iterator[list[tuple]]:
    """The matching rows as tuples (COLUMNS, then result: bytes on SQLite), one keyset chunk at a time
    (see iterate)."""
    after = None
    sqlite = isinstance(db.obj, SqliteDatabase)
    columns = [f if sqlite or i not in TIME_POSITIONS else _iso_in_sql(f) for i, (_, f) in enumerate(COLUMNS)]
    result = Message.result.cast("BLOB") if sqlite else Message.result
    while True:
        query = filters.where(Message.select(*columns, result))
        if after is not None:
            query = query.where(Tuple(Message.first_seen_at, Message.id) > Tuple(*after))
        sql, params = query.order_by(Message.first_seen_at, Message.id).limit(chunk).sql()
        rows = db.execute_sql(sql, params).fetchall()
        if rows:
            yield rows
        if len(rows) < chunk:
            return
        after = tuple(rows[-1][i] for i in KEY_POSITIONS)


def _iso_in_sql(column):
    """PostgreSQL writes the timestamp as ISO 8601 itself, as Python's isoformat() + "Z" would (no
    fraction when it is whole seconds): formatting datetimes in Python costs more than reading text,
    and the server does it on another core. A keyset bound in this form reads back as the timestamp."""
    whole = fn.date_trunc("second", column) == column
    return Case(None, [(whole, fn.to_char(column, 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))],
                fn.to_char(column, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))


def _result_text(stored) -> str | None:
    return stored.decode("utf-8") if isinstance(stored, bytes) else stored


class ResultCache(dict):
    """stored result -> what `make` gives for it, for the RESULT_CACHE most recent distinct results
    (roughly: it starts over when full)."""

    def __init__(self, make: Callable):
        super().__init__()
        self.make = make

    def __missing__(self, stored):
        if len(self) >= RESULT_CACHE:
            self.clear()
        value = self[stored] = self.make(stored)
        return value


def _columns(rows: list[tuple]) -> tuple[list, tuple]:
    """The chunk's cells column by column, timestamps as ISO 8601 text; and the stored results."""
    columns = list(zip(*rows, strict=True))
    stored = columns.pop()
    if isinstance(db.obj, SqliteDatabase):
        for i in TIME_POSITIONS:
            columns[i] = [value and value.replace(" ", "T", 1) + "Z" for value in columns[i]]
    return columns, stored


def _nulls_as(columns: list, empty: str) -> None:
    for i, column in enumerate(columns):
        if None in column:
            columns[i] = [empty if value is None else value for value in column]


def _csv_quote(text: str) -> str:
    if NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


class _CsvRows:
    """Row tuples -> CSV lines (the cells of flat_row, as csv.writer writes a row of them). The result's
    own cells come from the cache as finished CSV text, quoted by the same rule as the columns."""

    def __init__(self, keys: list[str], raw: bool):
        self.keys, self.raw = keys, raw
        self.results = ResultCache(self._result_text)

    def _result_text(self, stored) -> str:
        text = _result_text(stored)
        fields = result_fields(parse_result(text))
        cells = [cell(text), *(cell(fields.get(key)) for key in self.keys)]
        return "," + ",".join(_csv_quote(c if self.raw else defuse(c)) for c in cells) + "\r\n"

    def text(self, rows: list[tuple]) -> str:
        """The rows' CSV lines. A column's cells are defused and quoted one by one only where some
        cell of this chunk needs it (rare)."""
        columns, stored = _columns(rows)
        _nulls_as(columns, "")
        for i in TEXT_POSITIONS:
            joined = SEPARATOR + SEPARATOR.join(columns[i])
            if not self.raw and STARTS_FORMULA.search(joined):
                columns[i] = [defuse(value) for value in columns[i]]
                joined = SEPARATOR.join(columns[i])
            if NEEDS_QUOTES.search(joined):
                columns[i] = [_csv_quote(value) for value in columns[i]]
        return "".join(map(CSV_LINE.__mod__, zip(*columns, map(self.results.__getitem__, stored), strict=True)))


class _JsonRows:
    """Row tuples -> JSON objects (row_json, as json.dumps writes them), the result's JSON from the
    cache."""

    def __init__(self):
        self.results = ResultCache(lambda stored: _dumps(parse_result(_result_text(stored))))

    def texts(self, rows: list[tuple]) -> list[str]:
        columns, stored = _columns(rows)
        for i in (*TEXT_POSITIONS, *TIME_POSITIONS):
            columns[i] = ["null" if value is None else encode_json_string(value) for value in columns[i]]
        _nulls_as(columns, "null")
        return list(map(JSON_OBJECT.__mod__, zip(*columns, map(self.results.__getitem__, stored), strict=True)))


# ---- what the page shows ------------------------------------------------------------------------

@dataclass
class Summary:
    sent: int = 0
    delivered: int = 0
    session_started: int = 0
    answered: int = 0
    failed: int = 0                  # ended UNDELIVERED, ERROR or EXPIRED
    statuses: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    # field -> [(value as text, number of messages)], the ANSWER_VALUES most common: in numeric order
    # when every value of the field reads as a number, else most common first. A list counts each of
    # its elements (a multiple-choice answer).
    answers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # field -> (distinct values not in `answers`, how many times they were given), for cut fields only.
    other: dict[str, tuple[int, int]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)   # every field of the results, most common first
    lists: list[str] = field(default_factory=list)  # the fields that held a list (shares may sum past 100%)

    @property
    def funnel(self) -> list[tuple[str, str, int]]:
        return [("sent", "Sent", self.sent), ("delivered", "Delivered", self.delivered),
                ("session_started", "Session started", self.session_started),
                ("answered", "Answered", self.answered), ("failed", "Failed", self.failed)]

    def as_json(self) -> dict:
        return {"funnel": {key: count for key, _, count in self.funnel},
                "statuses": self.statuses, "stages": self.stages, "keys": self.keys,
                "answers": {key: [{"value": v, "count": c} for v, c in values]
                            for key, values in self.answers.items()},
                "other": {key: {"values": n, "count": c} for key, (n, c) in self.other.items()},
                "lists": self.lists}


def summarize(filters: Filters) -> Summary:
    """The funnel (sent -> delivered -> session started -> answered, and failed), statuses, stages,
    and how the bot's answers are distributed, for the matching messages, counted now."""
    return tally(filters.where).summary()


@dataclass
class Tally:
    """What a summary is made of, in a form that adds up: the tally of a set of messages plus the tally
    of another is the tally of both. Stored per mailing (receiver/summaries.py) as `as_json()`."""
    sent: int = 0
    delivered: int = 0
    session_started: int = 0
    answered: int = 0
    statuses: Counter = field(default_factory=Counter)
    stages: Counter = field(default_factory=Counter)
    keys: Counter = field(default_factory=Counter)             # field -> messages whose result has it
    lists: set = field(default_factory=set)                    # fields that held a list
    values: dict = field(default_factory=dict)                 # field -> Counter(value as text -> messages)

    def add(self, other: Tally) -> Tally:
        for name in ("sent", "delivered", "session_started", "answered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("statuses", "stages", "keys"):
            getattr(self, name).update(getattr(other, name))
        self.lists |= other.lists
        for key, counts in other.values.items():
            self.values.setdefault(key, Counter()).update(counts)
        return self

    def summary(self) -> Summary:
        summary = Summary(sent=self.sent, delivered=self.delivered, session_started=self.session_started,
                          answered=self.answered)
        for counts, target in ((self.statuses, summary.statuses), (self.stages, summary.stages)):
            for name, count in sorted(counts.items(), key=lambda item: (-item[1], str(item[0]))):
                if count:
                    target[name] = count
        summary.failed = sum(summary.statuses.get(name, 0) for name in FAILED_STATUSES)
        summary.keys = _by_frequency(+self.keys)
        summary.lists = [key for key in summary.keys if key in self.lists]
        for key in summary.keys:
            if self.values.get(key):
                summary.answers[key], rest = chart_values(self.values[key])
                if rest:
                    summary.other[key] = (len(rest), sum(count for _, count in rest))
        return summary

    def as_json(self) -> dict:
        return {"sent": self.sent, "delivered": self.delivered, "session_started": self.session_started,
                "answered": self.answered, "statuses": self.statuses, "stages": self.stages,
                "keys": self.keys, "lists": sorted(self.lists), "values": self.values}

    @classmethod
    def from_json(cls, document: dict) -> Tally:
        return cls(sent=document["sent"], delivered=document["delivered"],
                   session_started=document["session_started"], answered=document["answered"],
                   statuses=Counter(document["statuses"]), stages=Counter(document["stages"]),
                   keys=Counter(document["keys"]), lists=set(document["lists"]),
                   values={key: Counter(counts) for key, counts in document["values"].items()})


def tally(where: Callable) -> Tally:
    """The tally of the messages `where` (a function that adds a WHERE to a query) selects, counted
    now: four GROUP BY/COUNT queries, and each distinct result parsed once."""
    counted = Tally()
    counts = where(Message.select(
        fn.COUNT(Message.id), fn.COUNT(Message.delivered_at), fn.COUNT(Message.chat_id))).tuples()
    counted.sent, counted.delivered, counted.session_started = counts.get()
    for column, target in ((Message.status, counted.statuses), (Message.stage, counted.stages)):
        # Grouped by `column || ''`: by the column itself, SQLite may walk the whole (stage, ...) index
        # to get the groups in order rather than sort the few rows the WHERE finds.
        grouped = column.concat("")
        target.update(dict(where(Message.select(grouped, fn.COUNT(Message.id))).group_by(grouped).tuples()))
    for text, count in where(Message.select(Message.result, fn.COUNT(Message.id))).group_by(
            Message.result).tuples().iterator():
        fields = result_fields(parse_result(text))
        if not fields:          # null, {}, [] or only empty fields: the bot said nothing
            continue
        counted.answered += count
        for key, value in fields.items():
            counted.keys[key] += count
            if isinstance(value, list):
                counted.lists.add(key)
            values = counted.values.setdefault(key, Counter())
            for answer in answer_values(value):
                values[answer] += count
    return counted


def answer_values(value) -> list[str]:
    """The chart values one answer gives: a scalar itself, a list each distinct non-empty element."""
    items = value if isinstance(value, list) else [value]
    return list(dict.fromkeys(cell(item) for item in items if not empty(item)))


def chart_values(counts: Counter) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(values shown, values left for "other"): the ANSWER_VALUES most common shown, in numeric order
    when every value of the field reads as a number (the recipe's nps is the string "7")."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown, rest = ranked[:ANSWER_VALUES], ranked[ANSWER_VALUES:]
    if all(NUMBER.fullmatch(value) for value in counts):
        shown.sort(key=lambda item: (float(item[0]), item[0]))
    return shown, rest


@dataclass
class Mailing:
    kind: str            # "callbackData" or "bulkId"
    value: str
    messages: int
    last_seen_at: dt.datetime | None


def mailings(limit: int = 200) -> list[Mailing]:
    """The most recent mailings, by callbackData and by bulkId, newest first."""
    found = []
    for kind, column in (("callbackData", Message.callback_data), ("bulkId", Message.bulk_id)):
        last = fn.MAX(Message.first_seen_at)
        query = (Message.select(column, fn.COUNT(Message.id), last).where(column.is_null(False))
                 .group_by(column).order_by(last.desc()).limit(limit))
        for value, count, seen in query.tuples():
            if isinstance(seen, str):      # SQLite gives an aggregate of a date back as text
                seen = dt.datetime.fromisoformat(seen)
            found.append(Mailing(kind, value, count, seen))
    return found
