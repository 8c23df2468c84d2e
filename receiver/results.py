"""Reading the results: one query with its filters, keyset pages, flat rows, CSV and JSON streams.

The CLI export, the API and the results page all read through here, so a filter or a column means the
same thing everywhere. Rules: pages and streams walk keyset pages on (first_seen_at, message id), never
an OFFSET from the start (a stream finds a chunk's end CHUNK - 1 rows past the last key); a stream reads
each chunk whole and holds no cursor or read transaction open while the client reads; a `Tally` adds
up, so stored per-mailing tallies sum to the tally of all messages; CSV cells are defused unless `raw`.
What each column, filter and format means: docs/results.md.
"""
from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import queue
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring as encode_json_string

from peewee import SqliteDatabase, Tuple, Value, fn

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

KEY = (Message.first_seen_at, Message.id)          # the keyset order of pages and streams


def _select(filters: Filters, after: tuple | None, limit: int | None, columns: Iterable | None = None,
            upto: tuple | None = None, within: bool = False):
    """The matching rows' columns (default: the exports' columns and result) in keyset order, after
    `after` and up to `upto` (keys, both optional).

    within=True says that `after` is at or past `since`, and `upto` before `until`: true of keys read
    under the same filters (a chunk's bounds), and checked for a client's cursor (page). `since` then
    adds nothing past `after`, nor `until` before `upto`, and they are left out: SQLite takes one bound
    per side for the index's range, and with them it would read from `since` (or up to `until`) again
    for every chunk of a stream, and for every page."""
    columns = [*(f for _, f in COLUMNS), Message.result] if columns is None else columns
    if within:
        filters = replace(filters, since=None if after is not None else filters.since,
                          until=None if upto is not None else filters.until)
    query = filters.where(Message.select(*columns))
    if after is not None:
        query = query.where(Tuple(*KEY) > Tuple(*after))
    if upto is not None:
        query = query.where(Tuple(*KEY) <= Tuple(*upto))
    if after is not None and upto is not None and not _sqlite():
        # PostgreSQL counts the two key comparisons as unrelated: it takes a 5,000-row chunk late in
        # the table for 190,000 rows, and for the JSON export's costly column list it then scans the
        # whole table in parallel (80 ms a chunk instead of 14: EXPLAIN ANALYZE at 1M). The same range
        # on the time alone gives it the right count. The keys' times are text: they stay literals of
        # the column's type, compared as in the key comparisons.
        query = query.where(Message.first_seen_at.between(Value(after[0], converter=False),
                                                          Value(upto[0], converter=False)))
    return query.order_by(*KEY).limit(limit)


@dataclass
class Page:
    rows: list[dict]
    next_cursor: str | None


def page(filters: Filters, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
    """One page of raw rows (Message field names) after `cursor`; next_cursor is None on the last."""
    after = decode_cursor(cursor) if cursor else None
    within = after is not None and (filters.since is None or after[0] >= filters.since)
    rows = list(_select(filters, after, limit + 1, within=within).dicts().iterator())
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
        rows = list(_select(filters, after, chunk, within=True).dicts().iterator())
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
NUMBER_AFTER_SIGN = r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"
PLAIN_NUMBER = re.compile("[+-]?" + NUMBER_AFTER_SIGN)


def defuse(text: str) -> str:
    """A cell a spreadsheet would run as a formula, with a leading apostrophe: the spreadsheet shows it
    as text (OWASP's advice). Plain numbers stay as they are."""
    if text.startswith(FORMULA_STARTS) and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_stream(filters: Filters, excel: bool = False, raw: bool = False, chunk: int = CHUNK,
               keep_alive: Callable[[], None] = lambda: None, keys: list[str] | None = None,
               on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[bytes]:
    """The matching rows as CSV (UTF-8, RFC 4180 quoting, CRLF line ends), one piece per keyset chunk.

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
    yield ((EXCEL_BOM if excel else "") + _drain(buffer)).encode()
    shape = _CsvLines(filters, keys, raw)
    for lines, stored, bounds in _text_chunks(filters, _CsvRowText, chunk):
        keep_alive()
        on_rows(len(lines))
        yield shape.text(lines, stored, bounds)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _dumps(document) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def jsonl_stream(filters: Filters, chunk: int = CHUNK, keep_alive: Callable[[], None] = lambda: None,
                 on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[bytes]:
    """One JSON object per line (UTF-8)."""
    shape = _JsonLines()
    for objects, stored, _ in _text_chunks(filters, _JsonRowText, chunk):
        keep_alive()
        on_rows(len(objects))
        yield b"\n".join(shape.texts(objects, stored)) + b"\n"


def json_stream(filters: Filters, chunk: int = CHUNK, keep_alive: Callable[[], None] = lambda: None,
                on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[bytes]:
    """One JSON array (UTF-8), written as it is read: a download cut short lacks its closing `]`."""
    yield b"["
    separator = b"\n"
    shape = _JsonLines()
    for objects, stored, _ in _text_chunks(filters, _JsonRowText, chunk):
        keep_alive()
        on_rows(len(objects))
        yield separator + b",\n".join(shape.texts(objects, stored))
        separator = b",\n"
    yield b"\n]\n"


# ---- streams: each row as one text -----------------------------------------------------------------
# Reading a row's 18 cells into Python objects costs more than everything else an export does. So on
# SQLite the database writes each row as one text, in C (_read_chunk): a CSV line with its cells joined
# by SEPARATOR (printf), or a JSON object (json_object); timestamps as ISO 8601, null as nothing in CSV.
# PostgreSQL gives a chunk as COPY's text: a CSV line with its cells joined by SEPARATOR, or a JSON object
# the query writes (copy_sql), each as it is. Where a value of the chunk came out escaped (or would need
# escaping in JSON), that chunk is read by cells instead. A reader thread reads the next
# chunks while one is written (_text_chunks). Then Python adds each row's result, parsed and written once per
# distinct result (ResultCache), since a mailing's results repeat. For CSV it looks over a chunk's
# lines at once: where no cell holds the separator, nothing is to be quoted and nothing starts like a
# formula (nearly always), the separators become commas; otherwise that chunk is quoted and defused
# cell by cell, as csv.writer and `defuse` would. The output is the text csv.writer and json.dumps give
# for flat_row and row_json (tests/test_results.py). Figures: docs/performance.md, "Reading at scale".

RESULT_CACHE = 20_000       # distinct results kept per stream
READ_AHEAD = 2              # chunks read ahead, per reader thread, of the one being written
ROW_END = "\x1d"            # after a row's text and after its result, in a chunk the database joins
JSON_OBJECT = "{" + ",".join(f'"{name}":%s' for name in COLUMN_NAMES) + "}"
CONTROL_CHARACTERS = bytes(range(0x20))     # json.dumps escapes each of them
SEPARATOR = "\x1f"          # between a CSV line's cells as the database writes them; it starts no formula
CSV_QUOTED = (",", '"', "\r", "\n")       # a cell holding one of these is quoted (RFC 4180, as csv.writer)
# A cell (UTF-8) that `defuse` may change, just after a SEPARATOR: a formula start, or a sign not followed
# by the rest of a plain number (ASCII digits: a wider net than defuse's) up to the cell's end.
_SEP = re.escape(SEPARATOR.encode())
FORMULA_AFTER_SEPARATOR = re.compile(
    _SEP + b"(?:" + b"|".join(re.escape(c.encode()) for c in FORMULA_STARTS if c not in "+-")
    + b"|[+-](?!" + NUMBER_AFTER_SIGN.encode() + b"(?:" + _SEP + rb"|\Z)))")


def _sqlite() -> bool:
    return isinstance(db.obj, SqliteDatabase)


def _cells_sql() -> list:
    """The columns as the exports give them: timestamps as ISO 8601 text, null still null."""
    return [_iso_in_sql(f) if f.field_type == "DATETIME" else f for _, f in COLUMNS]


def _iso_in_sql(column):
    """A timestamp as Python's isoformat() + "Z" would write it, written by the database. SQLite holds
    peewee's text ("2025-03-01 10:15:02.123456"); PostgreSQL leaves out a zero fraction, as isoformat
    does. On PostgreSQL a keyset bound in this form reads back as the timestamp."""
    if _sqlite():
        return fn.replace(column, " ", "T").concat("Z")
    return fn.replace(fn.to_char(column, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), '.000000Z', "Z")


def _printf(pattern: str, *values):
    """`pattern` with each %s replaced by a value as text (null as nothing), by the database."""
    return (fn.printf if _sqlite() else fn.format)(pattern, *values)


class _CsvRowText:
    """A row as one CSV line before quoting: its cells joined by SEPARATOR, null as nothing."""

    @staticmethod
    def sql(cells: list, result=None):
        """Also `result` between ROW_ENDs (null as nothing), if given: in the one printf, which costs
        less than joining texts with ||."""
        pattern = SEPARATOR.join(["%s"] * len(cells))
        if result is None:
            return _printf(pattern, *cells)
        return _printf(pattern + ROW_END + "%s" + ROW_END, *cells, result)

    @staticmethod
    def from_columns(columns: list[list]) -> tuple[bytes, ...]:
        columns = [_nulls_as(column, "") for column in columns]
        return tuple(SEPARATOR.join(row).encode() for row in zip(*columns, strict=True))

    copy_sql = staticmethod(_cells_sql)

    @staticmethod
    def from_copy(text: bytes) -> tuple[tuple, tuple] | None:
        """PostgreSQL's COPY text of copy_sql and the result -> (lines, results); None where a value
        came out escaped."""
        if b"\\" in text:
            return None
        return _split_copy(text)


class _JsonRowText:
    """A row as one JSON object, as json.dumps(..., ensure_ascii=False, separators=(",", ":")) writes it
    (SQLite's json_object escapes the same characters the same way; COPY's text is used only where no
    value needs escaping)."""

    @staticmethod
    def sql(cells: list, result=None):
        """Also `result` between ROW_ENDs (null as nothing), if given."""
        text = fn.json_object(*(part for pair in zip(COLUMN_NAMES, cells, strict=True) for part in pair))
        if result is None:
            return text
        return text.concat(ROW_END).concat(fn.COALESCE(result, "")).concat(ROW_END)

    @staticmethod
    def from_columns(columns: list[list]) -> tuple[bytes, ...]:
        columns = [_nulls_as(column, "null") if f.field_type == "INT" else
                   ["null" if value is None else encode_json_string(value) for value in column]
                   for column, (_, f) in zip(columns, COLUMNS, strict=True)]
        return tuple((JSON_OBJECT % row).encode() for row in zip(*columns, strict=True))

    @staticmethod
    def copy_sql() -> list:
        """PostgreSQL: the row's JSON object as one text, each value as it is (texts between quotes),
        null as null. A quote in a text is written \\" so that, like every escape COPY adds, it comes out
        behind a backslash, and from_copy leaves that chunk to be read by cells. (to_json() on each
        value would escape it right, at half as much again of the server's time: docs/performance.md.)"""
        text = Value("{")
        for n, ((name, f), cell) in enumerate(zip(COLUMNS, _cells_sql(), strict=True)):
            if f.field_type == "INT":
                value = cell.cast("TEXT")
            else:
                quoted = cell if f.field_type == "DATETIME" else fn.replace(cell, '"', '\\"')
                value = Value('"').concat(quoted).concat('"')
            text = text.concat(("," if n else "") + f'"{name}":').concat(fn.COALESCE(value, "null"))
        return [text.concat("}")]

    @staticmethod
    def from_copy(text: bytes) -> tuple[tuple, tuple] | None:
        """PostgreSQL's COPY text of copy_sql and the result -> (objects, results); None where a value
        needs escaping in JSON: it came out behind a backslash, or holds a control character (COPY
        writes some as they are; a row has two of its own, the separator and the line end)."""
        if b"\\" in text or len(text) - len(text.translate(None, CONTROL_CHARACTERS)) != 2 * text.count(b"\n"):
            return None
        return _split_copy(text)


def _nulls_as(column: list, empty: str) -> list:
    return [empty if value is None else value for value in column] if None in column else column


def _read(filters: Filters, columns: list, after: tuple | None, upto: tuple) -> list[tuple]:
    """The matching rows' `columns` in (after, upto], as plain tuples, in keyset order."""
    return db.execute_sql(*_select(filters, after, None, columns, upto, within=True).sql()).fetchall()


def _result_sql():
    """The stored result; on SQLite as bytes, cheaper to read than a str."""
    return Message.result.cast("BLOB") if _sqlite() else Message.result


def _text_chunks(filters: Filters, shape, chunk: int) -> Iterator[tuple[tuple, tuple, tuple]]:
    """(each row's text as `shape` makes it (_CsvRowText, _JsonRowText), UTF-8; each row's stored
    result; (the key before the chunk, its last key)), one keyset chunk at a time, in order (see iterate).

    Reader threads read the next chunks (_read_chunk) while this one is written, each on a database
    connection of its own: the database's work and the waits for it run without Python's lock. The
    chunks' bounds are found here first, on the index alone. Two readers on SQLite were no faster than
    one (measured); on PostgreSQL each has a server process of its own. At most READ_AHEAD chunks per
    reader are held, so memory stays flat; a stream closed early (a client gone) cancels the rest."""
    readers = [_Reader() for _ in range(1 if _sqlite() else 2)]
    pending: deque = deque()
    after, n = None, 0
    try:
        while True:
            for bounds in _chunk_bounds(filters, chunk, after):
                pending.append((readers[n % len(readers)].read(filters, shape, bounds), bounds))
                after, n = bounds[1], n + 1
                if len(pending) > READ_AHEAD * len(readers):
                    yield from _when_read(*pending.popleft())
            if not pending:
                return
            while pending:
                yield from _when_read(*pending.popleft())
            # Asked again once all is written: rows stored meanwhile are in the export too.
    finally:
        for future, _ in pending:
            future.cancel()
        for reader in readers:
            reader.stop()


class _Reader:
    """A thread that reads chunks (_read_chunk) on a database connection of its own, kept open from
    one chunk to the next (a new SQLite connection starts with an empty page cache), in the order asked."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="export-reader", daemon=True)
        self.thread.start()

    def read(self, *args) -> Future:
        future: Future = Future()
        self.jobs.put((future, args))
        return future

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                future, args = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    db.connect(reuse_if_open=True)
                    future.set_result(_read_chunk(*args))
                except BaseException as error:      # the stream raises it
                    future.set_exception(error)
        finally:
            if not db.is_closed():
                db.close()


def _when_read(future, bounds) -> Iterator[tuple[tuple, tuple, tuple]]:
    texts, stored = future.result()
    if texts:                  # rows can be pruned between the bounds and the read
        yield texts, stored, bounds


def _chunk_bounds(filters: Filters, chunk: int, after: tuple | None) -> Iterator[tuple[tuple | None, tuple]]:
    """(the key before, the last key) of each chunk of `chunk` rows after `after`, then of a last,
    shorter one."""
    while True:
        keys = _select(filters, after, 1, _key_sql(), within=True)
        last = _key_at(keys.offset(chunk - 1))
        if last is None:
            last = _key_at(keys.order_by(*(f.desc() for f in KEY)))      # the last one
            if last is not None:
                yield after, last
            return
        yield after, last
        after = last


def _key_sql() -> list:
    """A row's key, its time as text: cheaper to read than a datetime, and it reads back as one."""
    return [Message.first_seen_at if _sqlite() else _iso_in_sql(Message.first_seen_at), Message.id]


def _key_at(query) -> tuple | None:
    return db.execute_sql(*query.sql()).fetchone()


def _read_chunk(filters: Filters, shape, bounds: tuple) -> tuple[tuple, tuple]:
    """(each row's text as `shape` makes it, UTF-8; each row's stored result) in (after, last].
    PostgreSQL: from COPY's text (`shape.from_copy`), or, where that cannot be used as it is, by cells."""
    after, last = bounds
    if _sqlite():
        return _sqlite_chunk(filters, shape, after, last)
    query = _select(filters, after, None, [*shape.copy_sql(), Message.result], last, within=True)
    chunk = shape.from_copy(_copy_out(query))
    return _cells_chunk(filters, shape, after, last) if chunk is None else chunk


def _sqlite_chunk(filters: Filters, shape, after: tuple | None, last: tuple) -> tuple[tuple, tuple]:
    """SQLite writes the rows' texts (`shape.sql`) and joins them into one text, each row followed by
    ROW_END, its result and ROW_END again: one step of the query, all in C. Where a row holds ROW_END
    itself (the parts do not add up), the chunk is read row by row instead."""
    row = shape.sql(_cells_sql(), Message.result)
    inner, params = _select(filters, after, None, [row.alias("row")], last, within=True).sql()
    # SQLite keeps a FROM subquery's ORDER BY when the outer query runs group_concat over it.
    joined, rows = db.execute_sql(
        f'SELECT CAST(group_concat("row", \'\') AS BLOB), count(*) FROM ({inner}) AS "chunk"', params).fetchone()
    if not rows:
        return (), ()
    parts = joined.split(ROW_END.encode())
    if len(parts) == 2 * rows + 1:
        return tuple(parts[0:-1:2]), tuple(parts[1::2])
    return tuple(zip(*_read(filters, [shape.sql(_cells_sql()).cast("BLOB"), _result_sql()], after, upto=last),
                     strict=True))


def _cells_chunk(filters: Filters, shape, after: tuple | None, last: tuple) -> tuple[tuple, tuple]:
    """PostgreSQL gives the cells and Python makes the rows' texts (`shape.from_columns`), escaping
    each value: for a chunk where COPY's text cannot be used as it is."""
    cells = [cell.cast("TEXT") if f.field_type == "INT" else cell
             for cell, (_, f) in zip(_cells_sql(), COLUMNS, strict=True)]
    rows = _read(filters, [*cells, Message.result], after, upto=last)
    if not rows:
        return (), ()
    *columns, stored = zip(*rows, strict=True)
    return shape.from_columns([list(column) for column in columns]), stored


class _Pieces(list):
    """A file for COPY ... TO STDOUT, which psycopg2 writes a row at a time."""
    write = list.append


def _copy_out(query) -> bytes:
    """The query's rows as PostgreSQL's COPY writes them, in UTF-8: the cells joined by SEPARATOR,
    null as nothing, each row ended by a line feed. A backslash, a line feed, CR, tab (and the other
    control characters C writes with a backslash) or SEPARATOR inside a value comes out behind a
    backslash. COPY is the server's own writer: no Python object per cell."""
    cursor = db.cursor()
    pieces = _Pieces()
    cursor.copy_expert(b"COPY (" + cursor.mogrify(*query.sql()) + b") TO STDOUT WITH (DELIMITER E'\\x1f', "
                       b"NULL '', ENCODING 'UTF8')", pieces)
    return b"".join(pieces)


def _split_copy(text: bytes) -> tuple[tuple, tuple]:
    """COPY's rows, each a row's text and its result -> (the texts, the results)."""
    rows = [row.rpartition(SEPARATOR.encode()) for row in text.split(b"\n")[:-1]]
    return tuple(row[0] for row in rows), tuple(row[2] for row in rows)


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


def _csv_quote(text: str) -> str:
    if any(c in text for c in CSV_QUOTED):
        return '"' + text.replace('"', '""') + '"'
    return text


class _CsvLines:
    """A chunk's lines as the database writes them -> CSV lines (the cells of flat_row, as csv.writer
    writes a row of them), UTF-8. The result's own cells come from the cache as finished CSV."""

    def __init__(self, filters: Filters, keys: list[str], raw: bool):
        self.filters, self.keys, self.raw = filters, keys, raw
        self.results = ResultCache(self._result_text)

    def _result_text(self, stored) -> bytes:
        text = _result_text(stored)
        fields = result_fields(parse_result(text))
        cells = [cell(text), *(cell(fields.get(key)) for key in self.keys)]
        return ("," + ",".join(_csv_quote(c if self.raw else defuse(c)) for c in cells) + "\r\n").encode()

    def text(self, lines: tuple[bytes, ...], stored: tuple, bounds: tuple) -> bytes:
        separator = SEPARATOR.encode()
        joined = separator + separator.join(lines)
        if joined.count(separator) != len(COLUMNS) * len(lines):
            # A cell holds the separator itself: read this chunk's cells one by one.
            after, last = bounds
            cells = [_printf("%s", cell) for cell in _cells_sql()]
            return self._by_cell(_read(self.filters, [*cells, _result_sql()], after, upto=last))
        if any(c.encode() in joined for c in CSV_QUOTED) or (not self.raw and FORMULA_AFTER_SEPARATOR.search(joined)):
            return self._by_cell([(*line.decode().split(SEPARATOR), s) for line, s in zip(lines, stored, strict=True)])
        lines = [line.replace(separator, b",") for line in lines]
        return b"".join(map(bytes.__add__, lines, map(self.results.__getitem__, stored)))

    def _by_cell(self, rows: list[tuple]) -> bytes:
        """Rows of cells as text, each with its stored result -> CSV lines, each cell defused and quoted
        on its own (a chunk where some cell needs it: rare)."""
        lines = []
        for *cells, stored in rows:
            cells = cells if self.raw else map(defuse, cells)
            lines.append(",".join(map(_csv_quote, cells)).encode() + self.results[stored])
        return b"".join(lines)


class _JsonLines:
    """A chunk's JSON objects as the database writes them -> row_json as json.dumps writes it (UTF-8):
    each object's closing brace gives way to the result's JSON, from the cache."""

    def __init__(self):
        self.results = ResultCache(
            lambda stored: (',"result":' + _dumps(parse_result(_result_text(stored))) + "}").encode())

    def texts(self, objects: tuple[bytes, ...], stored: tuple) -> list[bytes]:
        return list(map(bytes.__add__, [o[:-1] for o in objects], map(self.results.__getitem__, stored)))


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
