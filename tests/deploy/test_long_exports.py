"""A CSV export through gunicorn with deploy/gunicorn.conf.py: longer than the worker timeout it still
arrives whole, and one that fails midway is a broken download, never a short file that looks complete.

SQLite, 512,000 rows, read by a client slow enough that the download lasts several times
GUNICORN_TIMEOUT (2 s here) however fast the export runs.
"""
from __future__ import annotations

import csv
import io
import sqlite3
import time

import pytest
import requests

from receiver import create_app
from receiver.db import db
from receiver.models import Message

from ..support import API_TOKEN, bulk_messages, make_settings
from .helpers import Gunicorn

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 2                      # GUNICORN_TIMEOUT for these tests: the master kills a worker silent this long
BASE_ROWS, COPIES = 1000, 512    # 512,000 rows, about 2.5 s to export at full speed
PACE = 0.02                      # seconds the slow client waits after each piece of at most 1 MB
RESULT = {"confirmation": "Да", "nps": "9", "comment": "Всё понравилось, спасибо" * 3,
          "profile": {"city": "Тверь", "age": 30}, "choice": ["a", "b"]}
HEADERS = {"Authorization": f"Bearer {API_TOKEN}"}


def database_with_many_messages(tmp_path) -> tuple[str, list[str]]:
    """A SQLite database of BASE_ROWS * COPIES answered messages; (its URL, the ids in export order)."""
    url = f"sqlite:///{tmp_path}/receiver.db"
    app = create_app(make_settings(url))
    with app.app_context(), db.atomic():
        bulk_messages(BASE_ROWS, result=RESULT)
        # Copies made by the database: BASE_ROWS inserts through peewee, the rest in one statement.
        columns = [field.column_name for field in Message._meta.sorted_fields]
        copied = ", ".join("id || '-' || k" if name == "id" else name for name in columns)
        db.execute_sql(
            f"WITH RECURSIVE copies(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM copies WHERE k < {COPIES - 1}) "
            f"INSERT INTO message ({', '.join(columns)}) SELECT {copied} FROM message, copies")
        ids = [row[0] for row in Message.select(Message.id).order_by(Message.first_seen_at, Message.id).tuples()]
    db.close()
    assert len(ids) == BASE_ROWS * COPIES
    return url, ids


def test_an_export_longer_than_the_worker_timeout_arrives_whole(tmp_path):
    url, ids = database_with_many_messages(tmp_path)
    with Gunicorn(url, tmp_path, GUNICORN_TIMEOUT=str(TIMEOUT), GUNICORN_WORKERS="1") as server:
        started = time.monotonic()
        body = bytearray()
        with requests.get(f"{server.url}/api/results.csv", headers=HEADERS, stream=True, timeout=120) as answer:
            assert answer.status_code == 200
            for piece in answer.iter_content(1 << 20):
                body += piece
                time.sleep(PACE)
        elapsed = time.monotonic() - started
        text = body.decode("utf-8")
        time.sleep(0.3)       # the error log gets the master's lines
        logs = server.logs()
    # The download outlasted the timeout several times over: without the heartbeat the worker is killed.
    assert elapsed > 2 * TIMEOUT, f"the export took only {elapsed:.1f} s: add rows to make this test mean something"
    assert "WORKER TIMEOUT" not in logs, logs
    assert text.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [row["message_id"] for row in rows] == ids
    last = rows[-1]
    assert last["result.confirmation"] == "Да" and last["result.choice"] == '["a","b"]'
    assert None not in last.values() and len(last) == len(rows[0])      # the last line is whole


def test_an_export_that_fails_midway_is_a_broken_download(tmp_path):
    url, ids = database_with_many_messages(tmp_path)
    with Gunicorn(url, tmp_path, GUNICORN_TIMEOUT=str(TIMEOUT), GUNICORN_WORKERS="1") as server:
        received = b""
        with requests.get(f"{server.url}/api/results.csv", headers=HEADERS, stream=True, timeout=60) as answer:
            assert answer.status_code == 200
            pieces = answer.iter_content(64 * 1024)
            while received.count(b"\r\n") < 2:           # the header, and rows
                received += next(pieces)
            # The table goes away while the worker is still reading it (an export of tens of MB is far from
            # done after 64 KiB): its next chunk query fails.
            with sqlite3.connect(f"{tmp_path}/receiver.db") as connection:
                connection.execute("ALTER TABLE message RENAME TO message_gone")
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                for piece in pieces:
                    received += piece
        time.sleep(0.3)
        logs = server.logs()
    assert "no such table: message" in logs and "Error handling request" in logs, logs
    lines = received.decode("utf-8", errors="replace").count("\r\n")
    assert 1 < lines < len(ids)
