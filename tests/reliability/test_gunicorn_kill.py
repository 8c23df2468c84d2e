"""kill -9 of gunicorn (master and workers) in the middle of a load: no acknowledged callback is lost.

The load generator (bench/loadgen.py: keep-alive HTTP on raw sockets, several processes) records the
exact (message id, old status, new status) key of every callback answered 2xx, and of every callback
whose answer never came because the connection died. After the kills and a restart, the event table
must hold every acknowledged key, and nothing that was never sent: stored - acknowledged is a subset
of the unanswered ones (a callback may be committed and its worker killed before it answers; TWIN
then retries it and the duplicate is recorded once).
"""
from __future__ import annotations

import os
import signal
import threading
import time

from bench.ingest import children_of
from bench.loadgen import run_load
from receiver.db import bind, db
from receiver.models import Event

from ..deploy.helpers import Gunicorn
from ..support import CALLBACK_TOKEN, make_settings


def kill_all(server: Gunicorn) -> None:
    """SIGKILL the master and every worker at once (the process group), as a power cut of the service."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


def kill_workers(server: Gunicorn) -> list[int]:
    pids = children_of(server.process.pid)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def stored_keys(database_url: str) -> set[str]:
    bind(make_settings(database_url))
    try:
        with db.connection_context():
            return {f"{e.message_id}|{e.old_status or ''}|{e.new_status}"
                    for e in Event.select(Event.message_id, Event.old_status, Event.new_status)}
    finally:
        db.close()


def test_kill_9_of_master_and_workers_loses_no_acknowledged_callback(database_url, tmp_path):
    server = Gunicorn(database_url, tmp_path, GUNICORN_WORKERS="3", GUNICORN_ACCESS_LOG="")
    stop_file = tmp_path / "stop-load"
    outcome = {}

    def load():
        outcome["result"] = run_load("127.0.0.1", server.port, f"/callbacks/{CALLBACK_TOKEN}",
                                     connections=16, processes=2, duration=60, duplicates=0.1,
                                     stop_file=str(stop_file))

    server.start()
    generator = threading.Thread(target=load, daemon=True)
    try:
        generator.start()
        time.sleep(2.0)
        kill_all(server)                       # 1. master and workers, mid-load
        time.sleep(0.5)                        # the generator keeps retrying: connection refused
        server.start()
        time.sleep(2.0)
        killed = kill_workers(server)          # 2. the workers only: the master replaces them
        assert killed, "gunicorn had no workers to kill"
        time.sleep(2.0)
        kill_all(server)                       # 3. everything again, and a last restart
        server.start()
        time.sleep(1.5)
    finally:
        stop_file.touch()
        generator.join(timeout=30)
        server.stop()
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)

    result = outcome["result"]
    stored = stored_keys(database_url)
    acknowledged = result.acknowledged

    assert result.ok > 500, (result.statuses, server.logs()[-3000:])
    assert result.unknown or result.connect_errors, "the kills did not land during the load"
    assert not [s for s in result.statuses if s >= 300], result.statuses
    assert acknowledged - stored == set(), "acknowledged callbacks missing after kill -9"
    assert stored - acknowledged <= result.unknown, "stored callbacks that were never sent"
    print(f"\nkill -9 ({database_url.split(':')[0]}): {len(acknowledged)} acknowledged, {len(stored)} stored, "
          f"{len(result.unknown)} unanswered (of which stored: {len(stored & result.unknown)}), "
          f"{result.connect_errors} refused connects")

