"""receiver/results.py: the one query behind the export, the API and the page (both backends)."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import threading
from collections.abc import Callable

import pytest
from peewee import DatabaseError, SqliteDatabase
from werkzeug.datastructures import MultiDict

from receiver import results
from receiver.db import db
from receiver.models import Message
from receiver.results import FilterError, Filters

from .support import answer, bulk_messages, callback, seed, seed_mailing


def walk(filters: Filters, limit: int, between=None) -> list[str]:
    """Every id, page by page; `between(n)` runs after page n (to add rows mid-walk)."""
    seen, cursor, n = [], None, 0
    while True:
        found = results.page(filters, limit=limit, cursor=cursor)
        seen += [row["id"] for row in found.rows]
        if between:
            between(n)
        n += 1
        if found.next_cursor is None:
            return seen
        cursor = found.next_cursor


def written(pieces) -> str:
    """A stream's pieces (UTF-8) as the text a download would hold."""
    return b"".join(pieces).decode("utf-8")


def test_pages_give_every_row_once_while_rows_arrive(client):
    before = seed(client, 23)
    added = []

    def add(n):
        added.extend(seed(client, 2, prefix="late", start=2 * n))

    seen = walk(Filters(), limit=5, between=add)
    assert len(seen) == len(set(seen))
    assert seen[:23] == before                      # oldest first, none skipped
    assert set(seen) <= set(before) | set(added)
    assert set(added) - set(seen) <= set(added[-2:])  # only what came after the last page may be missing


def test_pages_split_rows_with_the_same_first_seen_time(app):
    ids = bulk_messages(37, same_time=True)
    assert walk(Filters(), limit=4) == sorted(ids)


def test_iterate_reads_in_chunks_and_sees_rows_added_while_streaming(client):
    seed(client, 20)
    stream = results.iterate(Filters(), chunk=6)
    first = next(stream)
    callback(client, "zz-late")
    rest = [row["id"] for row in stream]
    assert first["id"] == "m00000"
    assert rest[-1] == "zz-late" and len(rest) == 20


def test_streams_give_what_the_pages_give_across_chunks(app):
    """The streams read tuples from the cursor and format them their own way: the same rows and values as
    the pages, whatever the chunk, with times of whole seconds and with fractions, several at one time."""
    whole = bulk_messages(5, prefix="w", first_seen_at=dt.datetime(2025, 3, 1, 10, 0, 0), same_time=True)
    fraction = bulk_messages(6, prefix="f", first_seen_at=dt.datetime(2025, 3, 1, 10, 0, 0, 250000),
                             result={"nps": "9", "formula": "=1+1"})
    Message.update(delivered_at=dt.datetime(2025, 3, 1, 11, 0, 0, 5)).where(Message.id == fraction[0]).execute()
    expected = [results.row_json(row) for row in results.iterate(Filters())]
    assert [row["message_id"] for row in expected] == whole + fraction
    for chunk in (1, 4, 1000):
        assert json.loads(written(results.json_stream(Filters(), chunk=chunk))) == expected
        lines = written(results.jsonl_stream(Filters(), chunk=chunk)).splitlines()
        assert [json.loads(line) for line in lines] == expected
        text = written(results.csv_stream(Filters(), chunk=chunk, raw=True))
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert [row["message_id"] for row in rows] == whole + fraction
        assert rows[0]["first_seen_at"] == "2025-03-01T10:00:00Z"
        assert rows[5]["first_seen_at"] == "2025-03-01T10:00:00.250000Z"
        assert rows[5]["delivered_at"] == "2025-03-01T11:00:00.000005Z" == expected[5]["delivered_at"]
        assert rows[5]["result.formula"] == "=1+1"
    defused = list(csv.DictReader(io.StringIO(written(results.csv_stream(Filters(), chunk=4)), newline="")))
    assert defused[5]["result.formula"] == "'=1+1" and defused[0]["message_id"] == "w000000"


# Cells that csv.writer quotes, that a spreadsheet would run, that JSON escapes, or that are plain.
AWKWARD_CELLS = ("two\nlines", "cr\rhere", 'say "да"', "a, b", "=HYPERLINK(1)", "-5", "+7999", "@x", "\tlead",
                 "ctl\x01", "Опрос", "plain", "", "-5x", "+", "-.5e3", "sep\x1fhere", "=b\x1f-1", "row\x1dend",
                 "back\\slash \\N")


def test_streams_write_each_cell_as_csv_writer_and_json_dumps_would(app, monkeypatch):
    """Chunks are shaped column by column and a column only where it needs it: every cell must still come
    out as the row-at-a-time reference writes it (flat_row through csv.writer, row_json through
    json.dumps), in chunks that hold an awkward cell and chunks that do not."""
    ids = []
    for n, text in enumerate(AWKWARD_CELLS):
        ids += bulk_messages(3, prefix=f"c{n:02d}-", callback_data=text,
                             first_seen_at=dt.datetime(2025, 3, 1, 10, n), result={"name": text, "n": n})
    Message.update(given_up_reason="why,\nnot", bulk_id="=b").where(Message.id == ids[4]).execute()
    Message.update(phone=None, status_code=7).where(Message.id == ids[5]).execute()
    rows = list(results.iterate(Filters()))
    keys = results.result_keys(Filters())
    by_cells, cells_chunk = [], results._cells_chunk
    monkeypatch.setattr(results, "_cells_chunk", lambda *args: by_cells.append(args) or cells_chunk(*args))
    for raw in (True, False):
        reference = io.StringIO()
        writer = csv.writer(reference, lineterminator="\r\n")
        writer.writerow(results.csv_header(keys))
        for row in rows:
            cells = list(results.flat_row(row, keys).values())
            writer.writerow(cells if raw else [results.defuse(c) for c in cells])
        for chunk in (2, 3, 1000):
            assert written(results.csv_stream(Filters(), chunk=chunk, raw=raw)) == reference.getvalue()
    if not isinstance(db.obj, SqliteDatabase):     # PostgreSQL's COPY text, read by cells where a value is escaped
        assert 0 < len(by_cells) < len(rows)
    Message.update(result=None).execute()          # no result fields: the row ends with the empty `result`
    rows = list(results.iterate(Filters()))
    reference = io.StringIO()
    csv.writer(reference, lineterminator="\r\n").writerows(
        [results.csv_header([]), *(results.flat_row(row, []).values() for row in rows)])
    assert written(results.csv_stream(Filters(), chunk=3, raw=True)) == reference.getvalue()
    Message.update(result="not JSON, \x1d\n").where(Message.id == ids[7]).execute()
    rows = list(results.iterate(Filters()))
    objects = [json.dumps(results.row_json(row), ensure_ascii=False, separators=(",", ":")) for row in rows]
    by_cells.clear()
    for chunk in (2, 1000):
        assert written(results.jsonl_stream(Filters(), chunk=chunk)) == "".join(o + "\n" for o in objects)
    if not isinstance(db.obj, SqliteDatabase):
        assert 0 < len(by_cells) < len(rows) // 2


@pytest.fixture
def sqlite_steps(app, monkeypatch) -> Callable[[int], list]:
    """count(every) -> a list that gets an item for every `every` VM instructions SQLite runs, on this
    thread's connection and on each one opened later (a stream's reader threads)."""
    if not isinstance(db.obj, SqliteDatabase):
        pytest.skip("counts SQLite's steps")
    steps: list = []

    def count(every: int) -> list:
        connect = db.obj._connect

        def counted_connect():
            connection = connect()
            connection.set_progress_handler(lambda: steps.append(1), every)
            return connection

        monkeypatch.setattr(db.obj, "_connect", counted_connect)
        db.connection().set_progress_handler(lambda: steps.append(1), every)
        return steps

    return count


def test_a_stream_filtered_by_time_reads_each_chunk_once(sqlite_steps):
    """Each chunk of an export filtered by since/until is read as its own range of the key index: the
    database's work grows with the rows exported, not with their square (it used to read from `since`
    up to `until` again for every chunk). SQLite counts its steps on every connection."""
    steps = sqlite_steps(100)
    work = {}
    for size, day in ((600, 1), (1200, 2)):     # rows before the window, in it, and after it
        start = dt.datetime(2025, 3, day)
        bulk_messages(3 * size, prefix=f"d{day}-", first_seen_at=start, result={"nps": "9"})
        window = Filters.build(since=start + dt.timedelta(milliseconds=size),
                               until=start + dt.timedelta(milliseconds=2 * size))
        steps.clear()
        lines = written(results.csv_stream(window, chunk=20, keys=["nps"])).splitlines()
        assert len(lines) == 1 + size and lines[1].startswith(f"d{day}-{size:06d},")
        work[size] = len(steps)
    assert work[1200] < 3 * work[600]          # twice the rows, about twice the work (not four times)


def test_a_page_far_past_since_reads_from_its_cursor(sqlite_steps):
    """A page after a cursor is read from the cursor on the index, however far past `since` it is (it
    used to be read from `since`). SQLite counts its steps."""
    start = dt.datetime(2025, 3, 1)
    ids = bulk_messages(3000, prefix="p", first_seen_at=start)
    window = Filters.build(since=start + dt.timedelta(seconds=1))      # from the 1,001st row
    steps = sqlite_steps(10)
    work = {}
    for n in (1010, 2900):
        cursor = results.encode_cursor({"first_seen_at": start + dt.timedelta(milliseconds=n), "id": ids[n]})
        steps.clear()
        assert [row["id"] for row in results.page(window, limit=10, cursor=cursor).rows] == ids[n + 1:n + 11]
        work[n] = len(steps)
    assert work[2900] < 2 * work[1010]          # not the 1,900 rows more between `since` and the cursor
    before = results.encode_cursor({"first_seen_at": start, "id": ids[0]})      # a cursor from another query
    assert [row["id"] for row in results.page(window, limit=3, cursor=before).rows] == ids[1000:1003]


def readers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "export-reader"]


def test_a_stream_sees_rows_stored_while_it_runs_and_stops_its_readers_when_closed(app):
    first = bulk_messages(7, prefix="a", result={"nps": "9"})
    stream = results.jsonl_stream(Filters(), chunk=3)
    lines = next(stream).splitlines()
    assert readers()                                   # the next chunks are being read meanwhile
    later = bulk_messages(4, prefix="b", first_seen_at=dt.datetime(2026, 1, 1))
    lines += b"".join(stream).splitlines()
    assert [json.loads(line)["message_id"] for line in lines] == first + later
    assert not readers()

    stream = results.csv_stream(Filters(), chunk=2)
    next(stream), next(stream)                         # the header, then the first chunk
    stream.close()                                     # a client gone
    assert not readers()


def test_a_database_error_midway_ends_the_stream_with_that_error(app):
    """The HTTP layer then drops the connection without the last chunk (api.stream_response): a
    client sees a broken download, never a short one that looks whole."""
    bulk_messages(40)
    stream = results.csv_stream(Filters(), chunk=2)
    next(stream), next(stream)
    db.execute_sql('ALTER TABLE "message" RENAME TO "message_gone"')
    try:
        with pytest.raises(DatabaseError, match="message"):
            list(stream)
    finally:
        db.execute_sql('ALTER TABLE "message_gone" RENAME TO "message"')
    assert not readers()


def test_filters(client):
    a = seed(client, 3, prefix="a", callback_data="Опрос, март", bulk_id="b-1")
    b = seed(client, 2, prefix="b", callback_data="other", bulk_id="b-2", status="UNDELIVERED")
    c = seed(client, 2, prefix="c", callback_data="other", bulk_id="b-2", status="PENDING")
    answer(a[0], {"confirmation": "Да"})

    def ids(**kwargs):
        return [row["id"] for row in results.iterate(Filters.build(**kwargs))]

    assert ids(callback_data="Опрос, март") == a
    assert ids(bulk_id="b-2") == b + c
    assert ids(status="undelivered") == b
    assert ids(status="UNDELIVERED,PENDING") == b + c
    assert ids(status=["UNDELIVERED", "PENDING"]) == b + c
    assert ids(stage="done") == [a[0]]
    assert ids(stage="chat_id,done") == a
    assert ids(callback_data="other", status="PENDING") == c
    assert ids(callback_data="nobody") == []

    # since is inclusive, until exclusive, both on first_seen_at
    times = {m.id: m.first_seen_at for m in Message.select()}
    assert ids(since=times[b[0]]) == b + c
    assert ids(until=times[b[0]]) == a
    assert ids(since=times[b[0]].isoformat(), until=times[c[0]].isoformat() + "+00:00") == b
    # an offset is converted to UTC
    later = (times[b[0]] + dt.timedelta(hours=3)).isoformat() + "+03:00"
    assert ids(since=later) == b + c


@pytest.mark.parametrize("kwargs, param", [
    (dict(stage="finished"), "stage"),
    (dict(since="yesterday"), "since"),
    (dict(since="2025-01-02", until="2025-01-01"), "until"),
])
def test_bad_filters_name_the_parameter(kwargs, param):
    with pytest.raises(FilterError) as error:
        Filters.build(**kwargs)
    assert error.value.param == param


def test_from_args_refuses_unknown_parameters():
    with pytest.raises(FilterError) as error:
        Filters.from_args(MultiDict({"callback_data": "x"}))
    assert error.value.param == "callback_data"
    filters = Filters.from_args(MultiDict([("callbackData", "x"), ("status", "a"), ("status", "b,c"),
                                           ("since", "2025-01-01")]))
    assert filters == Filters(callback_data="x", status=("A", "B", "C"), since=dt.datetime(2025, 1, 1))
    assert Filters.from_args(MultiDict(filters.to_args())) == filters


def test_bad_cursor(app):
    for cursor in ("nonsense", "W10", "%%%"):
        with pytest.raises(FilterError) as error:
            results.page(Filters(), cursor=cursor)
        assert error.value.param == "cursor"


def test_the_longest_cursor_given_out_is_read_back(app):
    # A 128-character id of characters JSON writes as surrogate pairs: the longest key there is.
    row = {"first_seen_at": dt.datetime(2025, 3, 1, 10, 15, 2, 123456), "id": "\U0001f600" * 128}
    cursor = results.encode_cursor(row)
    assert len(cursor) <= results.MAX_CURSOR
    assert results.decode_cursor(cursor) == (row["first_seen_at"], row["id"])


@pytest.mark.parametrize("cell, shown", [
    ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'), ("@SUM(A1)", "'@SUM(A1)"),
    ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"), ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
    ("\t=1+1", "'\t=1+1"), ("\r=1+1", "'\r=1+1"), ("\n=1+1", "'\n=1+1"), ("\uff1d1+1", "'\uff1d1+1"),
    ("- пункт", "'- пункт"), ("-", "'-"),
    # Plain numbers are read as numbers, never as formulas: they stay.
    ("-5", "-5"), ("+79991234567", "+79991234567"), ("-2.5e3", "-2.5e3"), ("+.5", "+.5"),
    # Only the first character counts; the rest of a cell is text.
    ("Да", "Да"), ("", ""), ("1+1", "1+1"), ("a=1", "a=1"), ("'=1", "'=1"),
])
def test_defuse(cell, shown):
    assert results.defuse(cell) == shown


def test_rows_flattened_for_csv_and_kept_whole_for_json(client):
    ids = seed(client, 4)
    answer(ids[0], {"confirmation": "Отказ", "nps": 7, "tags": ["a", "б"], "extra": {"x": None, "y": {"z": 1}},
                    "ok": True, "initialVariables": []})
    answer(ids[1], {"confirmation": "Да", "initialVariables": {}})
    answer(ids[2], "not json at all")
    keys = results.result_keys(Filters())
    # Nested objects are flattened at any depth; fields that are only ever empty get no column.
    assert keys == ["confirmation", "extra.y.z", "nps", "ok", "result", "tags"]

    rows = {row["id"]: row for row in results.iterate(Filters())}
    flat = results.flat_row(rows[ids[0]], keys)
    assert flat["result.confirmation"] == "Отказ"
    assert flat["result.nps"] == "7"
    assert flat["result.tags"] == '["a","б"]'
    assert flat["result.extra.y.z"] == "1"
    assert flat["result.ok"] == "true"
    assert json.loads(flat["result"])["initialVariables"] == []       # the stored text, as it was
    assert results.flat_row(rows[ids[1]], keys)["result.nps"] == ""
    odd = results.flat_row(rows[ids[2]], keys)
    assert odd["result"] == "not json at all" and odd["result.confirmation"] == ""
    assert odd["result.result"] == "not json at all"                  # a result that is not an object
    empty = results.flat_row(rows[ids[3]], keys)
    assert empty["result"] == "" and empty["chat_id"] == "" and empty["status"] == "DELIVERED"

    document = results.row_json(rows[ids[0]])
    assert list(document)[:3] == ["message_id", "callback_data", "bulk_id"]
    assert document["result"]["tags"] == ["a", "б"] and document["result"]["initialVariables"] == []
    assert document["first_seen_at"].endswith("Z")
    assert results.row_json(rows[ids[3]])["result"] is None


def test_summary_funnel_and_answers(client):
    sent = seed_mailing(client, "survey", 6, undelivered=2, answers=[
        {"confirmation": "Да", "nps": 10}, {"confirmation": "Да", "nps": 9},
        {"confirmation": "Отказ", "nps": 10, "meta": {"a": 1}},
        {}])                                  # session closed without an answer
    seed(client, 3, prefix="x", callback_data="elsewhere")
    Message.update(chat_id="chat-only").where(Message.id == sent[4]).execute()

    summary = results.summarize(Filters(callback_data="survey"))
    assert summary.as_json()["funnel"] == {"sent": 8, "delivered": 6, "session_started": 5, "answered": 3,
                                           "failed": 2}
    assert summary.statuses == {"DELIVERED": 6, "UNDELIVERED": 2}
    assert summary.stages == {"chat_id": 2, "done": 4, "none": 2}
    assert summary.answers == {"confirmation": [("Да", 2), ("Отказ", 1)], "nps": [("9", 1), ("10", 2)],
                               "meta.a": [("1", 1)]}
    assert summary.keys == ["confirmation", "nps", "meta.a"]


def test_answers_of_every_type_are_charted_sensibly(client):
    ids = seed(client, 28, callback_data="types")
    answer(ids[0], {"nps": "7", "choice": ["a", "b", "a"], "agreed": True, "profile": {"age": 30, "city": "Тверь"},
                    "initialVariables": [], "comment": "first"})
    answer(ids[1], {"nps": "10", "choice": ["b"], "agreed": False, "profile": {"age": 41.5},
                    "initialVariables": {}, "comment": ""})
    answer(ids[2], {"nps": 9, "choice": [], "agreed": True, "profile": {}, "comment": None})
    answer(ids[3], {"initialVariables": [], "profile": {}})      # only empty fields: not an answer
    answer(ids[4], [])
    for n, message_id in enumerate(ids[5:25]):                   # free text: every answer different
        answer(message_id, {"comment": f"text {n:02d}", "nps": "Тест" if n == 0 else "8"})

    summary = results.summarize(Filters(callback_data="types"))

    assert summary.answered == 23
    assert "initialVariables" not in summary.keys and "profile" not in summary.keys
    answers = summary.answers
    assert answers["choice"] == [("b", 2), ("a", 1)]                   # each choice once per message
    assert answers["agreed"] == [("true", 2), ("false", 1)]
    assert answers["profile.age"] == [("30", 1), ("41.5", 1)]          # numbers in numeric order
    assert answers["profile.city"] == [("Тверь", 1)]
    assert answers["nps"] == [("8", 19), ("10", 1), ("7", 1), ("9", 1), ("Тест", 1)]   # not all numbers
    assert answers["comment"] == [("first", 1)] + [(f"text {n:02d}", 1) for n in range(11)]
    assert summary.other == {"comment": (9, 9)}        # 21 different texts: 12 shown
    assert summary.lists == ["choice"]


def test_numeric_strings_sort_as_numbers(client):
    ids = seed(client, 4, callback_data="nps")
    for message_id, nps in zip(ids, ["10", "7", 9, "7"], strict=True):
        answer(message_id, {"nps": nps})
    assert results.summarize(Filters(callback_data="nps")).answers["nps"] == [("7", 2), ("9", 1), ("10", 1)]


def test_failed_counts_every_failed_status(client):
    seed(client, 2, prefix="d", callback_data="f")
    for status in ("UNDELIVERED", "ERROR", "EXPIRED", "PENDING"):
        seed(client, 1, prefix=status.lower(), callback_data="f", status=status)
    summary = results.summarize(Filters(callback_data="f"))
    assert (summary.sent, summary.delivered, summary.failed) == (6, 2, 3)
    assert summary.statuses["EXPIRED"] == 1


def test_mailings_newest_first(client):
    seed(client, 2, prefix="o", callback_data="old", bulk_id="bulk-old")
    seed(client, 1, prefix="n", callback_data="new", bulk_id="bulk-new")
    found = [(m.kind, m.value, m.messages) for m in results.mailings()]
    assert found == [("callbackData", "new", 1), ("callbackData", "old", 2),
                     ("bulkId", "bulk-new", 1), ("bulkId", "bulk-old", 2)]
    assert all(isinstance(m.last_seen_at, dt.datetime) for m in results.mailings())
