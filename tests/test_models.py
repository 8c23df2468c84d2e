"""Storage: the schema and its upgrades, its callback_data index, and how SQLite writers take their turns."""
from __future__ import annotations

import hashlib
import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from peewee import IntegerField, Model, OperationalError, TextField

from receiver import models, results
from receiver.db import QueuedSqliteDatabase, db, sqlite_pragmas, write_transaction
from receiver.models import Event, Message

from .support import callback_body, make_settings

pytestmark = pytest.mark.timeout(60)

# What schema 1 had where schema 2 differs, written over a schema-2 database that holds callbacks.
SCHEMA_1 = [
    "DROP INDEX event_transition",
    "ALTER TABLE event ADD COLUMN dedup_key TEXT",
    "UPDATE event SET dedup_key = message_id || '|' || COALESCE(old_status, '') || '|' || new_status",
    "CREATE UNIQUE INDEX event_dedup_key ON event (dedup_key)",
    "CREATE INDEX event_message_id ON event (message_id)",
    "CREATE INDEX event_received_at ON event (received_at)",
    "DROP INDEX message_send_id",
    "CREATE INDEX message_send_id ON message (send_id)",
    "DROP INDEX message_chat_id",
    "CREATE INDEX message_chat_id ON message (chat_id)",
    "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
]


def event_rows():
    return [(e.message_id, e.old_status, e.new_status, e.raw) for e in Event.select().order_by(Event.id)]


def index_sql(table):
    return {index.name: index.sql for index in db.get_indexes(table) if not index.name.endswith("pkey")}


def test_a_schema_1_database_comes_up_current_with_its_events_still_deduplicated(app, client, callback_path):
    for old, new in ((None, "PENDING"), ("PENDING", "DELIVERED")):
        assert client.post(callback_path, json=callback_body(old=old, new=new)).status_code == 200
    with db.connection_context():
        for statement in SCHEMA_1:
            db.execute_sql(statement)
        before = event_rows()

    models.create_schema()
    models.create_schema()                      # and again: a second start changes nothing

    with db.connection_context():
        assert "dedup_key" not in {column.name for column in db.get_columns("event")}
        assert event_rows() == before
        assert set(index_sql("event")) == {"event_transition"}
        assert all("WHERE" in index_sql("message")[name].upper() for name in ("message_send_id", "message_chat_id"))
        assert models.Fact.get_by_id("schema_version").value == models.SCHEMA_VERSION == "3"
    repeat = client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED"))
    fresh = client.post(callback_path, json=callback_body("m-2", old=None, new="PENDING"))
    assert repeat.json == {"stored": True, "duplicate": True}
    assert fresh.json == {"stored": True, "duplicate": False}
    with db.connection_context():
        assert len(event_rows()) == 3


# Schema 2 indexed the whole callback_data, on PostgreSQL too, where a long one cannot be indexed.
SCHEMA_2 = ['DROP INDEX IF EXISTS "message_callback_data_prefix"',
            'CREATE INDEX IF NOT EXISTS "message_callback_data_first_seen_at_id" ON message (callback_data, first_seen_at, id)',
            "UPDATE meta SET value = '2' WHERE key = 'schema_version'"]
# 10,000 bytes of UTF-8 (TWIN takes 10,240) that do not compress: a PostgreSQL btree key holds about 2,700
# bytes once compressed.
LONG_CALLBACK_DATA = "Опрос " + "".join(hashlib.sha256(bytes([n])).hexdigest() for n in range(157))[:9_989]


def callback_data_indexes() -> set[str]:
    return {name for name in index_sql("message") if "callback_data" in name}


def test_a_schema_2_database_comes_up_current_and_takes_a_long_callback_data(app, settings, client, callback_path):
    with db.connection_context():
        for statement in SCHEMA_2:
            db.execute_sql(statement)

    models.create_schema()
    models.create_schema()                      # and again: a second start changes nothing

    with db.connection_context():
        expected = "message_callback_data_first_seen_at_id" if settings.is_sqlite else "message_callback_data_prefix"
        assert callback_data_indexes() == {expected}
        assert models.Fact.get_by_id("schema_version").value == models.SCHEMA_VERSION
    assert client.post(callback_path, json=callback_body(callbackData=LONG_CALLBACK_DATA)).status_code == 200


def test_a_long_callback_data_is_stored_whole_and_found_exactly(client, callback_path, api_headers):
    assert len(LONG_CALLBACK_DATA.encode()) == 10_000
    same_start = LONG_CALLBACK_DATA[:-5] + "иначе"       # differs only in its last characters
    for message_id, callback_data in (("m-1", LONG_CALLBACK_DATA), ("m-2", same_start), ("m-3", "short")):
        answer = client.post(callback_path, json=callback_body(message_id, callbackData=callback_data))
        assert answer.status_code == 200, answer.get_json()

    for path in ("/api/results", "/api/messages"):
        found = client.get(path, query_string={"callbackData": LONG_CALLBACK_DATA}, headers=api_headers).get_json()
        rows = found.get("results", found.get("messages"))
        assert [(row.get("message_id", row.get("id")), row["callback_data"]) for row in rows] == [
            ("m-1", LONG_CALLBACK_DATA)], path


def test_reading_a_mailing_by_callback_data_uses_its_index(app, settings):
    query = (results.Filters(callback_data=LONG_CALLBACK_DATA).where(models.Message.select())
             .order_by(models.Message.first_seen_at, models.Message.id).limit(100))
    sql, params = query.sql()
    with db.connection_context(), db.atomic():
        if not settings.is_sqlite:
            db.execute_sql("SET LOCAL enable_seqscan = off")   # an empty table is read whole otherwise
        explain = "EXPLAIN QUERY PLAN " if settings.is_sqlite else "EXPLAIN "
        plan = " ".join(str(row[-1]) for row in db.execute_sql(explain + sql, params))
    expected = "message_callback_data_first_seen_at_id" if settings.is_sqlite else "message_callback_data_prefix"
    assert expected in plan, plan


def test_an_event_without_an_old_status_is_stored_once(client, callback_path):
    first = client.post(callback_path, json=callback_body(old=None, new="PENDING"))
    again = client.post(callback_path, json=callback_body(old=None, new="PENDING"))

    assert (first.json["duplicate"], again.json["duplicate"]) == (False, True)
    with db.connection_context():
        assert Event.select().count() == 1 and Message.get_by_id("m-1").status == "PENDING"


# --- SQLite writers' turns ----------------------------------------------------------------------------

class Row(Model):
    n = IntegerField()
    note = TextField(default="x" * 1000)        # rows that take pages of their own


@pytest.fixture
def queued(tmp_path):
    """A QueuedSqliteDatabase with a table, bound to `db` as the app binds it."""
    settings = make_settings(f"sqlite:///{tmp_path}/turns.db")
    database = QueuedSqliteDatabase(settings.sqlite_path, pragmas=sqlite_pragmas(settings),
                                    timeout=30, check_same_thread=False)
    db.initialize(database)
    Row.bind(database)
    with database.connection_context():
        database.create_tables([Row])
    yield database
    database.close()


def insert(n):
    with write_transaction():
        Row.create(n=n)


def in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


HOLD_A_TURN = textwrap.dedent("""
    import sys
    from receiver.db import WriterQueue
    with WriterQueue(sys.argv[1] + "-writers.lock", sys.argv[1]).turn():
        print("holding", flush=True)
        sys.stdin.readline()
""")


def test_a_writer_waits_while_another_process_has_its_turn_and_writes_when_it_ends(queued, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_TURN, f"{tmp_path}/turns.db"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        writer = in_thread(insert, 1)
        writer.join(0.5)
        assert writer.is_alive(), "the write did not wait for the other process's turn"
        assert Row.select().count() == 0

        holder.stdin.write("done\n")
        holder.stdin.flush()
        writer.join(10)
        assert not writer.is_alive()
        assert [row.n for row in Row.select()] == [1]
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_process_gives_up_its_turn(queued, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_TURN, f"{tmp_path}/turns.db"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()

    insert(1)
    assert Row.select().count() == 1


def test_threads_of_one_process_take_turns(queued):
    inside, release, order = threading.Event(), threading.Event(), []

    def slow():
        with write_transaction():
            Row.create(n=1)
            inside.set()
            release.wait(10)
            order.append("first")

    def quick():
        insert(2)
        order.append("second")

    first = in_thread(slow)
    assert inside.wait(10)
    second = in_thread(quick)
    second.join(0.3)
    assert second.is_alive(), "the second thread did not wait for the first one's turn"
    release.set()
    first.join(10), second.join(10)
    assert order == ["first", "second"]
    assert sorted(row.n for row in Row.select()) == [1, 2]


def test_a_write_inside_a_write_does_not_wait_for_itself(queued):
    with write_transaction():
        Row.create(n=1)
        with write_transaction():
            Row.create(n=2)
    assert Row.select().count() == 2


def test_writes_go_on_when_the_turn_file_cannot_be_opened(tmp_path, caplog):
    (tmp_path / "turns.db-writers.lock").mkdir()        # a directory where the file would be
    with caplog.at_level(logging.WARNING, logger="receiver.db"):
        database = QueuedSqliteDatabase(str(tmp_path / "turns.db"), pragmas={"journal_mode": "wal"})
        db.initialize(database)
        Row.bind(database)
        database.create_tables([Row])
        insert(1)
        insert(2)
    assert Row.select().count() == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "receiver.db"]
    assert len(warnings) == 1 and "cannot open" in warnings[0] and "busy handler" in warnings[0]
    database.close()


def test_the_wal_reaches_the_database_file_after_every_hundredth_write(queued, tmp_path):
    database_file = tmp_path / "turns.db"
    queued.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    size = database_file.stat().st_size
    every = QueuedSqliteDatabase.CHECKPOINT_EVERY
    for n in range(every - 1):
        insert(n)
    assert database_file.stat().st_size == size, "checkpointed before its time (or by SQLite itself)"
    insert(every)
    assert database_file.stat().st_size > size, "the writes never reached the database file"


def test_a_failed_checkpoint_does_not_undo_the_write_before_it(queued, monkeypatch, caplog):
    execute_sql = queued.execute_sql

    def disk_full_at_checkpoint(sql, *args, **kwargs):
        if sql.startswith("PRAGMA wal_checkpoint"):
            raise OperationalError("database or disk is full")
        return execute_sql(sql, *args, **kwargs)

    monkeypatch.setattr(queued, "execute_sql", disk_full_at_checkpoint)
    with caplog.at_level(logging.WARNING, logger="receiver.db"):
        for n in range(QueuedSqliteDatabase.CHECKPOINT_EVERY):
            insert(n)
    assert Row.select().count() == QueuedSqliteDatabase.CHECKPOINT_EVERY
    assert any("checkpoint failed" in r.getMessage() and "disk is full" in r.getMessage() for r in caplog.records)


def test_the_turn_file_has_the_database_file_s_permissions(queued, tmp_path):
    insert(1)
    database, turns = tmp_path / "turns.db", tmp_path / "turns.db-writers.lock"
    assert turns.stat().st_mode & 0o777 == database.stat().st_mode & 0o666


def test_a_postgresql_connection_is_kept_between_requests(app, settings, client, callback_path):
    if settings.is_sqlite:
        pytest.skip("PostgreSQL's pool")

    def server_process():
        with db.connection_context():
            return db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]

    first = server_process()
    assert client.post(callback_path, json=callback_body()).status_code == 200
    assert server_process() == first


def test_an_open_that_finds_the_new_file_locked_is_tried_again(tmp_path, monkeypatch):
    # As when gunicorn's workers all open a new database at once: the first open's pragmas meet a lock.
    locked_once = []

    def set_pragmas(self, conn):
        if not locked_once:
            locked_once.append(True)
            raise sqlite3.OperationalError("database is locked")
        return original(self, conn)

    original = QueuedSqliteDatabase._set_pragmas
    monkeypatch.setattr(QueuedSqliteDatabase, "_set_pragmas", set_pragmas)
    database = QueuedSqliteDatabase(str(tmp_path / "new.db"), pragmas={"journal_mode": "wal"}, timeout=5)
    database.connect()
    assert locked_once and database.execute_sql("PRAGMA journal_mode").fetchone() == ("wal",)
    database.close()
