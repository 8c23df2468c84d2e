"""A disk that fills up, a database that turns read-only: 503 (TWIN retries), a log line, and recovery.

How each failure is produced, honestly (the tests run as root, which ignores file permissions, and
mounting a tiny or read-only filesystem needs privileges a CI runner does not have):

* full disk, at the OS: RLIMIT_FSIZE is lowered for this process to the WAL file's current size, so the
  kernel refuses the next write() that grows it (EFBIG; Python ignores SIGXFSZ). SQLite reports it as
  SQLITE_IOERR_WRITE ("disk I/O error") - the same path as any failed write() on a full disk, except that
  ENOSPC is reported as SQLITE_FULL; the limit is raised again without restarting anything.
* full database: PRAGMA max_page_count pinned at the current page count, which makes SQLite answer exactly
  what a full disk gives it: SQLITE_FULL, "database or disk is full".
* read-only: PRAGMA query_only on the app's own connection: SQLITE_READONLY, "attempt to write a
  readonly database", the error a read-only file or mount produces.

In each case: the answer is 503 with Retry-After, the log says why, no event or message row is
half-written, and once the condition is lifted the same callback is stored (200) with no restart.
SQLite only: these are the failure modes of a database file on a local disk.
"""
from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path

import pytest

from receiver import create_app
from receiver.db import db
from receiver.models import Event, Message

from ..support import CALLBACK_TOKEN, make_settings

PATH = f"/callbacks/{CALLBACK_TOKEN}"


@pytest.fixture
def sqlite_app(tmp_path):
    app = create_app(make_settings(f"sqlite:///{tmp_path}/receiver.db"))
    app.config["TESTING"] = True
    yield app
    if not db.is_closed():
        db.close()


def callback(message_id, padding=0):
    body = {"id": message_id, "oldStatus": "PENDING", "newStatus": "DELIVERED", "newStatusCode": 6,
            "callbackData": "disk-test", "price": 1.2}
    if padding:
        body["note"] = "x" * padding        # kept in the raw copy: a big row that needs new pages
    return json.dumps(body)


def post(client, message_id, padding=0):
    return client.post(PATH, data=callback(message_id, padding), content_type="application/json")


def state():
    return ([tuple(m.__data__.items()) for m in Message.select().order_by(Message.id)],
            [(e.message_id, e.old_status, e.new_status) for e in Event.select().order_by(Event.id)])


def assert_503_then_recovery(client, caplog, message_id, why, lift, padding=0):
    before = state()
    with caplog.at_level(logging.ERROR, logger="receiver.callbacks"):
        refused = post(client, message_id, padding)
    assert refused.status_code == 503, refused.data
    assert refused.headers.get("Retry-After", "").isdigit()
    assert refused.json["error"] == "storage_unavailable"
    lines = [r.getMessage() for r in caplog.records if r.name == "receiver.callbacks"]
    assert any(message_id in line and why in line for line in lines), lines
    lift()
    assert state() == before, "a refused callback left something behind"

    stored = post(client, message_id, padding)
    assert stored.status_code == 200 and stored.json == {"stored": True, "duplicate": False}
    assert Message.get_by_id(message_id).status == "DELIVERED"
    assert Event.select().where(Event.message_id == message_id).count() == 1


def test_a_full_disk_is_a_503_until_space_comes_back(sqlite_app, caplog):
    client = sqlite_app.test_client()
    assert post(client, "before").status_code == 200
    wal = Path(sqlite_app.config["SETTINGS"].database_url.split("sqlite:///", 1)[1] + "-wal")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(wal), hard))
    try:
        assert_503_then_recovery(client, caplog, "m-disk-full", "disk I/O error",
                                 lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard)), padding=20_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_database_is_a_503_until_it_may_grow(sqlite_app, caplog):
    client = sqlite_app.test_client()
    assert post(client, "before").status_code == 200
    db.connect(reuse_if_open=True)          # the app's connection (same thread as the test client)
    pages = db.execute_sql("PRAGMA page_count").fetchone()[0]
    db.execute_sql(f"PRAGMA max_page_count = {pages}")

    assert_503_then_recovery(client, caplog, "m-db-full", "database or disk is full",
                             lambda: db.execute_sql("PRAGMA max_page_count = 1073741823"),
                             padding=30_000)


def test_a_read_only_database_is_a_503_until_it_is_writable(sqlite_app, caplog):
    client = sqlite_app.test_client()
    assert post(client, "before").status_code == 200
    db.connect(reuse_if_open=True)
    db.execute_sql("PRAGMA query_only = 1")

    assert_503_then_recovery(client, caplog, "m-read-only", "readonly database",
                             lambda: db.execute_sql("PRAGMA query_only = 0"))
