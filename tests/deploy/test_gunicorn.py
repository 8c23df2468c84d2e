"""gunicorn with deploy/gunicorn.conf.py, over a real socket, on SQLite and on PostgreSQL."""
from __future__ import annotations

import json
import os
import re
import runpy
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests

from receiver import models
from receiver.db import bind, db

from ..support import CALLBACK_TOKEN, make_settings
from .helpers import GUNICORN_CONF, Gunicorn

pytestmark = pytest.mark.timeout(90)

THREADS, PER_THREAD = 8, 100


def post_callbacks(url: str, prefix: str, count: int) -> list[tuple[str, int, str]]:
    """POST `count` distinct callbacks on one keep-alive session; (message id, status, body) each."""
    answers = []
    with requests.Session() as session:
        for n in range(count):
            message_id = f"{prefix}-{n}"
            body = {"id": message_id, "oldStatus": "PENDING", "newStatus": "DELIVERED",
                    "newStatusCode": 200, "callbackData": prefix}
            try:
                answer = session.post(f"{url}/callbacks/{CALLBACK_TOKEN}", json=body, timeout=15,
                                      headers={"Authorization": "Bearer must-not-be-logged-0123456789"})
                answers.append((message_id, answer.status_code, answer.text))
            except requests.RequestException as error:
                answers.append((message_id, -1, repr(error)))
    return answers


def stored_event_ids(database_url: str, prefix: str) -> set[str]:
    bind(make_settings(database_url))
    try:
        with db.connection_context():
            query = models.Event.select(models.Event.message_id).where(
                models.Event.message_id.startswith(prefix + "-"))
            return {event.message_id for event in query}
    finally:
        db.close()


def test_concurrent_callbacks_are_all_stored_and_the_token_is_never_logged(database_url, tmp_path):
    with Gunicorn(database_url, tmp_path) as server:
        with ThreadPoolExecutor(THREADS) as pool:
            results = [a for batch in pool.map(lambda t: post_callbacks(server.url, f"load{t}", PER_THREAD),
                                               range(THREADS)) for a in batch]
        statuses = {}
        for _, status, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
        acknowledged = {message_id for message_id, status, _ in results if status == 200}
        # Every request was answered 200: no 500, no 503, no dropped connection.
        assert statuses == {200: THREADS * PER_THREAD}, statuses
        assert all(json.loads(text) == {"stored": True, "duplicate": False} for _, _, text in results)
        time.sleep(0.5)     # let the access log lines of the last requests reach the file
        exit_code = server.stop()

    assert exit_code == 0, server.logs()
    stored = set().union(*(stored_event_ids(database_url, f"load{t}") for t in range(THREADS)))
    assert acknowledged <= stored
    assert len(stored) == THREADS * PER_THREAD

    logs = server.logs()
    assert "database is locked" not in logs
    assert "Traceback" not in logs
    access = server.access_log.read_text()
    assert access.count('"POST /callbacks/*** HTTP/1.1" 200') == THREADS * PER_THREAD
    for text in (access, logs):
        assert CALLBACK_TOKEN not in text
        assert "must-not-be-logged" not in text


def test_sighup_reloads_workers_gracefully_and_sigterm_stops(tmp_path):
    database_url = f"sqlite:///{tmp_path}/receiver.db"
    with Gunicorn(database_url, tmp_path, GUNICORN_WORKERS="2") as server:
        booted = server.error_log.read_text().count("Booting worker")
        answers, stop = [], threading.Event()

        def keep_posting():
            n = 0
            while not stop.is_set():
                answers.extend(post_callbacks(server.url, f"hup{n}", 5))
                n += 1

        poster = threading.Thread(target=keep_posting)
        poster.start()
        try:
            time.sleep(0.3)
            server.signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while server.error_log.read_text().count("Booting worker") < booted + 2:
                assert time.monotonic() < deadline, server.logs()
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            poster.join(timeout=30)
        assert answers and {status for _, status, _ in answers} == {200}, \
            {status for _, status, _ in answers}
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert "Handling signal: hup" in server.error_log.read_text()
        assert server.process.poll() is None
        post_callbacks(server.url, "after-hup", 3)     # served by the new workers
        time.sleep(0.3)
        assert server.stop() == 0
    assert "Shutting down: Master" in server.logs()
    access = server.access_log.read_text()
    assert CALLBACK_TOKEN not in access + server.logs()      # the reloaded logger still redacts
    assert access.count("/callbacks/***") >= len(answers) + 3


def test_metrics_directory_keeps_live_processes_files_and_drops_dead_ones(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    dead = metrics / "counter_4194303.db"           # above any pid this machine hands out
    live = metrics / f"counter_{os.getpid()}.db"   # a running process (the flask worker, say)
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    with Gunicorn(f"sqlite:///{tmp_path}/receiver.db", tmp_path) as server:
        assert not dead.exists()
        assert live.exists()
        assert all(status == 200 for _, status, _ in post_callbacks(server.url, "metrics", 20))
        worker_files = [p.name for p in metrics.glob("counter_*.db") if p != live]
        assert worker_files, "the workers keep their counts in PROMETHEUS_MULTIPROC_DIR"


# --- the conf file itself ---------------------------------------------------------------------------

def load_conf(monkeypatch, tmp_path, **env):
    for key in ("GUNICORN_WORKERS", "GUNICORN_WORKER_CLASS", "GUNICORN_BIND", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    return SimpleNamespace(**runpy.run_path(str(GUNICORN_CONF)))


def test_conf_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    conf = load_conf(monkeypatch, tmp_path)
    assert conf.bind == ["127.0.0.1:8000"]
    assert conf.worker_class == "sync"
    assert conf.workers == 4                # SQLite: one per CPU, capped (one writer)
    assert conf.preload_app is False
    assert conf.timeout == 30 and conf.graceful_timeout == 30
    assert conf.control_socket_disable is True

    conf = load_conf(monkeypatch, tmp_path, DATABASE_URL="postgresql://db/receiver")
    assert conf.workers == 17               # 2 x CPU + 1

    for cpus, workers in ((1, 2), (2, 2), (3, 3)):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert load_conf(monkeypatch, tmp_path).workers == workers, cpus

    conf = load_conf(monkeypatch, tmp_path, GUNICORN_WORKERS="6", GUNICORN_BIND="0.0.0.0:8080",
                     GUNICORN_WORKER_CLASS="gthread")
    assert (conf.workers, conf.bind, conf.worker_class, conf.threads) == (6, ["0.0.0.0:8080"], "gthread", 4)


def test_conf_sets_a_metrics_directory_when_none_is_given(monkeypatch, tmp_path):
    conf = load_conf(monkeypatch, tmp_path, PROMETHEUS_MULTIPROC_DIR=None)
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]     # for the workers gunicorn forks
    assert re.search(rf"twin24-receiver-metrics-{os.getuid()}$", directory)
    assert os.path.isdir(directory)
    assert callable(conf.on_starting) and callable(conf.child_exit)


@pytest.mark.parametrize("line", [
    f"POST /callbacks/{CALLBACK_TOKEN} HTTP/1.1",
    f"POST /callbacks/{CALLBACK_TOKEN}?x=1 HTTP/1.1",
    f"POST /Callbacks/{CALLBACK_TOKEN}/ HTTP/1.1",
    f"Error handling request /callbacks/{CALLBACK_TOKEN}",
    f"GET /api/messages?id=1&token={CALLBACK_TOKEN} HTTP/1.1",
    f"GET /api/messages?api_key={CALLBACK_TOKEN}&id=1 HTTP/1.1",
])
def test_redact(monkeypatch, tmp_path, line):
    conf = load_conf(monkeypatch, tmp_path)
    cleaned = conf.redact(line)
    assert CALLBACK_TOKEN not in cleaned
    assert "***" in cleaned


def test_access_log_atoms_drop_authorization(monkeypatch, tmp_path):
    conf = load_conf(monkeypatch, tmp_path)
    from gunicorn.config import Config
    logger = conf.RedactingLogger(Config())
    environ = {"REQUEST_METHOD": "POST", "RAW_URI": f"/callbacks/{CALLBACK_TOKEN}", "SERVER_PROTOCOL": "HTTP/1.1",
               "PATH_INFO": f"/callbacks/{CALLBACK_TOKEN}", "QUERY_STRING": "", "REMOTE_ADDR": "10.0.0.1",
               "HTTP_AUTHORIZATION": "Basic dXNlcjpzZWNyZXQ="}
    request = SimpleNamespace(headers=[("AUTHORIZATION", "Basic dXNlcjpzZWNyZXQ="), ("COOKIE", "s=1")])
    response = SimpleNamespace(status="200 OK", sent=10, headers=[])
    import datetime as dt
    atoms = logger.atoms(response, request, environ, dt.timedelta(milliseconds=3))
    text = repr(atoms)
    assert CALLBACK_TOKEN not in text
    assert "dXNlcjpzZWNyZXQ" not in text and "user" not in atoms["u"]
    assert atoms["{authorization}i"] == "***" and atoms["{cookie}i"] == "***"
    assert atoms["r"] == "POST /callbacks/*** HTTP/1.1"


def test_app_log_lines_are_redacted_in_workers(monkeypatch, tmp_path):
    """Flask logs "Exception on <path> [POST]" for an unhandled error: the token must not show there."""
    import logging

    from flask.logging import default_handler

    conf = load_conf(monkeypatch, tmp_path)
    conf.post_worker_init(SimpleNamespace(wsgi=None, notify=lambda: None))     # a worker without the app
    record = logging.LogRecord("receiver", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                               (f"/callbacks/{CALLBACK_TOKEN}", "POST"), None)
    assert default_handler.filter(record)
    assert record.getMessage() == "Exception on /callbacks/*** [POST]"


def test_a_bad_setting_stops_gunicorn_at_once_instead_of_booting_workers_forever(tmp_path):
    server = Gunicorn(f"sqlite:///{tmp_path}/receiver.db", tmp_path, API_TOKEN="13-characters")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="gunicorn exited with 3"):
        server.start(timeout=30)
    took = time.monotonic() - started

    assert took < 20
    lines = [line for line in server.logs().splitlines() if "API_TOKEN: must be at least 16 characters" in line]
    assert len(lines) == 1, server.logs()          # the master stops before it boots a worker
    assert "Booting worker" not in server.logs()
    assert "Traceback" not in server.logs()
