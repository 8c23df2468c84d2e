"""The engine: how SQLite writers take their turns, checkpoints, opening the file, and PostgreSQL's
connection kept between requests."""
from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from peewee import IntegerField, Model, OperationalError, TextField

from receiver.db import QueuedSqliteDatabase, db, sqlite_pragmas, write_transaction

from .support import callback_body, make_settings

pytestmark = pytest.mark.timeout(60)


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
