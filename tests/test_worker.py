"""The enrichment worker as the separate process it is in production (`python -m receiver worker`)."""
from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from peewee import InterfaceError

from receiver.db import db, utcnow
from receiver.models import Event, Message
from receiver.worker import Worker

from .support import (
    ROOT,
    all_settled,
    assert_matches_truth,
    bulk_messages,
    phones,
    send_mailing,
    settings_env,
    start_worker,
    stop_worker,
    wait_for,
)


def test_a_worker_killed_mid_batch_again_and_again_loses_nothing(settings, twin, live_app, tmp_path):
    # Slow statistics pages, so that a kill lands in the middle of a sweep.
    twin.configure(slow_rate=1.0, slow_seconds=0.3, page_cap=10)
    ids = send_mailing(twin, live_app.url, phones(60))
    assert twin.wait_idle(timeout=30)
    env = settings_env(settings) | {"ENRICH_LEASE": "2", "ENRICH_POLL_INTERVAL": "0.1"}
    rng = random.Random(5)

    for _ in range(3):
        worker = start_worker(env, tmp_path / "worker.log")
        time.sleep(rng.uniform(0.8, 1.6))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    assert not all_settled(), "the kills landed before the work was done"

    worker = start_worker(env, tmp_path / "worker.log")
    try:
        settled = wait_for(all_settled, timeout=60, interval=0.2)
    finally:
        exit_code = stop_worker(worker, timeout=15)

    assert settled, (tmp_path / "worker.log").read_text()[-3000:]
    assert_matches_truth(twin, {m.id: m for m in Message.select()}, ids)
    assert exit_code == 0, "SIGTERM lets the current sweep finish and exits cleanly"
    assert Message.select().where(Message.lease_until.is_null(False)).count() == 0


@pytest.fixture
def own_signals():
    """Leave SIGTERM and SIGINT as they were after a worker installed its handlers."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


class Passes:
    """An enricher that records each pass and does what the test says on it."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.calls = 0

    def run_once(self, force=False):
        self.calls += 1
        self.steps.pop(0)()


def test_a_pass_that_loses_the_database_reconnects_and_the_next_pass_goes_on(app, own_signals):
    settings = app.config["SETTINGS"]
    slept = []

    def lose_the_database():
        db.close()
        raise InterfaceError("connection already closed")

    def stop():
        assert not db.is_closed(), "the worker reconnected before this pass"
        worker.stopping = True

    enricher = Passes(lose_the_database, stop)
    worker = Worker(settings, None, enricher, sleep=slept.append)
    worker.run()

    assert enricher.calls == 2
    assert slept == [settings.enrich_backoff_start, settings.enrich_poll_interval, settings.enrich_poll_interval]


def test_sigterm_lets_the_current_pass_finish_then_the_worker_stops(app, own_signals):
    settings = app.config["SETTINGS"]
    enricher = Passes(lambda: os.kill(os.getpid(), signal.SIGTERM))
    worker = Worker(settings, None, enricher, sleep=lambda _seconds: None)
    worker.run()
    assert worker.stopping and enricher.calls == 1


def test_a_worker_without_twin_credentials_still_prunes_old_events_and_keeps_the_summaries(
        settings, client, api_headers):
    """Callbacks arrive without TWIN credentials too: the results' summaries must not be left to be
    counted live on every read (seconds at ten million messages)."""
    assert not settings.has_twin24_credentials
    for n, received_at in enumerate([utcnow() - dt.timedelta(days=settings.event_retention_days + 1), utcnow()]):
        Event.create(message_id=f"m-{n}", old_status="PENDING", new_status="DELIVERED", raw="{}",
                     received_at=received_at)
    bulk_messages(3, callback_data="spring")
    assert client.get("/api/results/summary", headers=api_headers).get_json()["as_of"] is None   # counted live

    run = subprocess.run([sys.executable, "-m", "receiver", "worker", "--once"], cwd=ROOT, env=settings_env(settings),
                         capture_output=True, text=True, timeout=60)

    assert run.returncode == 0, run.stderr
    assert "worker: no TWIN credentials" in run.stderr
    assert [e.message_id for e in Event.select()] == ["m-1"]
    stored = client.get("/api/results/summary?callbackData=spring", headers=api_headers).get_json()
    assert stored["as_of"] is not None, "read from the stored summaries"
    assert stored["funnel"]["sent"] == 3 and stored["statuses"] == {"DELIVERED": 3}
