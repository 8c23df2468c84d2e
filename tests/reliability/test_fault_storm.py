"""The enrichment worker killed mid-batch, again and again, while TWIN misbehaves in every way at once.

The storm: 20% random 5xx, a rate limit low enough that every sweep runs into 429 bursts, stalled
answers, pages of 10 items, and access tokens that live 2 seconds (the worker logs in with TWIN24_LOGIN
and TWIN24_PASSWORD, so it must refresh or log in again all the time).

Scaling of the stalls: production TWIN stalls of ~10 s against a 60 s read timeout only cost time; what
tests the client is a stall that outlasts the read timeout. Here the read timeout is 1 s and the
stalls 1.5 s, which exercises the same path (timeout, retry, backoff) in a fraction of the time.

At the end every message must match the simulator's ground truth (final status, chat_id = session id,
result), and the simulator must have taken the mailing exactly once.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver import create_app, models
from receiver.models import Message
from receiver.simulator import SimConfig, Simulator

from ..conftest import FAST_TWIN, LiveServer, make_settings
from ..support import phones, send_mailing, settings_env, wait_for
from ..test_enrich import assert_matches_truth

ROOT = Path(__file__).resolve().parents[2]


def start_worker(env, log_path):
    return subprocess.Popen([sys.executable, "-m", "receiver", "worker"], cwd=ROOT, env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def all_settled():
    return Message.select().where(Message.stage.not_in(["done", "given_up"])).count() == 0


@pytest.fixture
def storm_twin():
    with Simulator(SimConfig(seed=29, token_ttl=2.0, **FAST_TWIN)).start() as simulator:
        yield simulator


def test_worker_killed_repeatedly_in_a_fault_storm_ends_correct(database_url, storm_twin, tmp_path):
    twin = storm_twin
    settings = make_settings(
        database_url, twin24_login=twin.login, twin24_password=twin.password,
        twin24_auth_url=twin.auth_url, twin24_notify_url=twin.notify_url, twin24_analyse_url=twin.analyse_url,
        twin24_connect_timeout=1.0, twin24_read_timeout=1.0, twin24_retries=5, twin24_max_retry_wait=1.0)
    app = create_app(settings)
    server = LiveServer(app).start()
    log_path = tmp_path / "worker.log"
    worker = None
    try:
        ids = send_mailing(twin, server.url, phones(80))
        assert twin.wait_idle(timeout=30)
        twin.configure(error_rate=0.2, rate_limit=4, slow_rate=0.1, slow_seconds=1.5, page_cap=10)
        env = settings_env(settings) | {"ENRICH_LEASE": "3", "ENRICH_POLL_INTERVAL": "0.1"}
        rng = random.Random(7)

        for _ in range(5):
            worker = start_worker(env, log_path)
            time.sleep(rng.uniform(1.0, 2.5))
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        models.db.connect(reuse_if_open=True)
        assert not all_settled(), "the kills landed after the work was done"

        worker = start_worker(env, log_path)
        settled = wait_for(all_settled, timeout=150, interval=0.5)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        assert settled, log_path.read_text(errors="replace")[-3000:]

        assert_matches_truth(twin, {m.id: m for m in Message.select()}, ids)
        assert Message.select().where(Message.stage == "given_up").count() == 0
        calls = twin.calls()
        assert calls["send"] == {"200": 1}, calls["send"]          # the mailing went out once
        stats = {**calls.get("messages_stats", {})}
        for outcome, n in calls.get("sessions_stats", {}).items():
            stats[outcome] = stats.get(outcome, 0) + n
        assert stats.get("429") and any(o in stats for o in ("500", "502", "503")), calls
        assert sum(calls.get("login", {}).values()) + sum(calls.get("refresh", {}).values()) > 3, calls
        print(f"\nfault storm ({database_url.split(':')[0]}): TWIN calls {calls}")
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
        server.stop()
        if not models.db.is_closed():
            models.db.close()
