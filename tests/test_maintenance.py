"""flask backup (SQLite online backup while the service writes), flask prune and the worker's prune (event
retention)."""
from __future__ import annotations

import datetime as dt
import sqlite3
import stat
import threading
import time

import pytest

from receiver import create_app, maintenance
from receiver.db import db, utcnow
from receiver.models import Event, Message, Rejected
from receiver.settings import Settings

from .support import make_settings, settings_env, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.timeout(60)


def add_events(prefix: str, count: int, received_at: dt.datetime | None = None, raw_size: int = 40):
    rows = [dict(message_id=f"{prefix}-{n}", old_status="PENDING", new_status="DELIVERED", raw="x" * raw_size,
                 received_at=received_at or utcnow()) for n in range(count)]
    with db.atomic():
        for start in range(0, len(rows), 200):
            Event.insert_many(rows[start:start + 200]).execute()


# --- backup -------------------------------------------------------------------------------------------

@pytest.fixture
def sqlite_app(tmp_path):
    app = create_app(make_settings(f"sqlite:///{tmp_path}/live/receiver.db"))
    yield app
    db.close()


def test_backup_while_another_thread_writes(sqlite_app, tmp_path):
    # Enough data that the copy takes a moment, committed before the backup begins.
    add_events("before", 6000, raw_size=2000)
    written, stop, errors = [], threading.Event(), []

    def writer():
        n = 0
        try:
            while not stop.is_set():
                with db.atomic():      # this thread's own connection, as a web worker has
                    Event.insert(message_id=f"during-{n}", new_status="PENDING",
                                 raw="{}").execute()
                written.append(n)
                n += 1
        except Exception as error:            # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 20:
            time.sleep(0.005)
        at_start = len(written)
        copy = maintenance.backup(tmp_path / "copy.db")
        at_end = len(written)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not errors, errors
    assert at_end > at_start, "the writer was not blocked during the backup"

    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert not (tmp_path / "copy.db-wal").exists()
    connection = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        assert connection.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        before = connection.execute("SELECT count(*) FROM event WHERE message_id LIKE 'before-%'").fetchone()[0]
        during = connection.execute("SELECT count(*) FROM event WHERE message_id LIKE 'during-%'").fetchone()[0]
        assert before == 6000
        assert at_start <= during <= len(written)      # a consistent snapshot: everything committed by then
        assert connection.execute("SELECT count(*) FROM results").fetchone() is not None
    finally:
        connection.close()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_backup_into_a_directory_keeps_the_newest(sqlite_app, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()
    add_events("a", 3)
    for day in range(1, 5):
        maintenance.backup(backups, keep=2, now=dt.datetime(2026, 1, day, 3, 0, 0))
    assert sorted(p.name for p in backups.iterdir()) == ["receiver-20260103T030000Z.db",
                                                           "receiver-20260104T030000Z.db"]


def test_backup_command(sqlite_app, tmp_path):
    add_events("cli", 5)
    result = sqlite_app.test_cli_runner().invoke(args=["backup", str(tmp_path / "cli.db")])
    assert result.exit_code == 0, result.output
    assert "backup written" in result.output
    connection = sqlite3.connect(tmp_path / "cli.db")
    assert connection.execute("SELECT count(*) FROM event").fetchone()[0] == 5
    connection.close()

    result = sqlite_app.test_cli_runner().invoke(args=["backup", str(tmp_path / "missing" / "x.db")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_backup_on_each_backend(app, settings, tmp_path):
    result = app.test_cli_runner().invoke(args=["backup", str(tmp_path / "copy.db")])
    if settings.is_sqlite:
        assert result.exit_code == 0 and (tmp_path / "copy.db").exists()
    else:   # PostgreSQL: refused, with what to use instead
        assert result.exit_code == 1
        assert "pg_dump" in result.output
        assert not (tmp_path / "copy.db").exists()


# --- prune --------------------------------------------------------------------------------------------

def test_prune_removes_old_events_only_and_leaves_messages(app):
    now = utcnow()
    add_events("old", 25, received_at=now - dt.timedelta(days=40))
    add_events("edge", 3, received_at=now - dt.timedelta(days=29, hours=23))
    add_events("new", 5, received_at=now - dt.timedelta(hours=1))
    Message.insert_many([{"id": f"old-{n}", "status": "DELIVERED"} for n in range(25)]).execute()
    Rejected.create(reason="unparsable_json", received_at=now - dt.timedelta(days=31))
    Rejected.create(reason="unparsable_json", received_at=now)

    dry = maintenance.prune(30, dry_run=True, now=now)
    assert (dry.events, dry.rejected, dry.dry_run) == (25, 1, True)
    assert Event.select().count() == 33

    result = maintenance.prune(30, batch_size=4, now=now)     # 7 batches
    assert (result.events, result.rejected) == (25, 1)
    left = {e.message_id.rsplit("-", 1)[0] for e in Event.select()}
    assert left == {"edge", "new"} and Event.select().count() == 8
    assert Rejected.select().count() == 1
    assert Message.select().count() == 25                      # messages stay, with their status
    assert maintenance.prune(30, now=now).events == 0


def test_prune_command_uses_the_retention_setting(database_url):
    app = create_app(make_settings(database_url, event_retention_days=7))
    try:
        add_events("old", 4, received_at=utcnow() - dt.timedelta(days=8))
        add_events("new", 2)
        runner = app.test_cli_runner()
        result = runner.invoke(args=["prune", "--dry-run"])
        assert result.exit_code == 0, result.output
        assert "would delete 4 events" in result.output and Event.select().count() == 6
        result = runner.invoke(args=["prune"])
        assert "deleted 4 events" in result.output and Event.select().count() == 2
        result = runner.invoke(args=["prune", "--days", "1"])
        assert "deleted 0 events" in result.output
    finally:
        db.close()


def test_prune_command_without_retention_deletes_nothing(database_url):
    app = create_app(make_settings(database_url, event_retention_days=0))
    try:
        add_events("old", 2, received_at=utcnow() - dt.timedelta(days=1000))
        result = app.test_cli_runner().invoke(args=["prune"])
        assert result.exit_code == 0
        assert "retention is off" in result.output
        assert Event.select().count() == 2
    finally:
        db.close()


def test_prune_walks_in_id_order_and_stops_at_the_first_event_to_keep(app):
    now = utcnow()
    add_events("old", 5, received_at=now - dt.timedelta(days=40))
    add_events("new", 3, received_at=now)
    # Received out of order behind a younger one (another web host's clock): left to a later prune.
    add_events("late", 1, received_at=now - dt.timedelta(days=40))
    assert maintenance.prune(30, batch_size=2, now=now).events == 5
    assert sorted(e.message_id for e in Event.select()) == ["late-0", "new-0", "new-1", "new-2"]


# --- the worker's prune ---------------------------------------------------------------------------------

def test_the_default_retention_keeps_events_90_days():
    assert Settings.from_env(environ={}, env_file=None).event_retention_days == 90


def test_periodic_prune_goes_in_small_passes_then_waits_an_hour(app):
    add_events("old", 2500, received_at=utcnow() - dt.timedelta(days=91))
    add_events("new", 10)
    clock = [1000.0]
    periodic = maintenance.PeriodicPrune(90, batches_per_pass=1, clock=lambda: clock[0])

    passes = [periodic.run_if_due() for _ in range(3)]          # 1,000 rows a pass, one after the other
    assert [(r.events, r.finished) for r in passes] == [(1000, False), (1000, False), (500, True)]
    assert Event.select().count() == 10
    add_events("older", 3, received_at=utcnow() - dt.timedelta(days=100))
    assert periodic.run_if_due() is None                        # done: the next prune comes in an hour
    clock[0] += 3600
    assert periodic.run_if_due().events == 3
    assert Event.select().count() == 10
    assert maintenance.PeriodicPrune(0).run_if_due() is None    # EVENT_RETENTION_DAYS=0: off


def old_events_and_kept_results():
    """Events past the default retention, recent ones, and the messages and results of both."""
    now = utcnow()
    add_events("old", 30, received_at=now - dt.timedelta(days=91))
    add_events("new", 5)
    Message.insert_many([{"id": f"{age}-{n}", "status": "DELIVERED", "stage": "done", "result": '{"answer":"yes"}',
                          "first_seen_at": now - dt.timedelta(days=91 if age == "old" else 0)}
                         for age, count in (("old", 30), ("new", 5)) for n in range(count)]).execute()


def run_worker_until_pruned(settings, tmp_path):
    env = settings_env(settings)
    env.pop("EVENT_RETENTION_DAYS")                            # the default applies
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        pruned = wait_for(lambda: Event.select().count() == 5, timeout=30, interval=0.1)
    finally:
        exit_code = stop_worker(worker, timeout=15)
    output = log.read_text()
    assert pruned, output[-3000:]
    assert exit_code == 0, output[-3000:]
    assert "pruned 30 events and 0 refused callbacks" in output


def assert_only_old_events_went():
    assert {e.message_id.split("-")[0] for e in Event.select()} == {"new"}
    assert Message.select().count() == 35
    rows = db.execute_sql("SELECT message_id, result FROM results").fetchall()
    assert len(rows) == 35 and {result for _, result in rows} == {'{"answer":"yes"}'}


def test_the_worker_prunes_old_events_and_keeps_messages_and_results(settings, app, twin, tmp_path):
    old_events_and_kept_results()
    run_worker_until_pruned(settings, tmp_path)
    assert_only_old_events_went()


def test_the_worker_without_twin_credentials_still_prunes(settings, app, tmp_path):
    assert not settings.has_twin24_credentials
    old_events_and_kept_results()
    run_worker_until_pruned(settings, tmp_path)
    assert_only_old_events_went()
