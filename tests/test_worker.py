"""The enrichment worker as the separate process it is in production (`python -m receiver worker`)."""
from __future__ import annotations

import random
import signal
import time

from receiver.models import Message

from .support import (
    all_settled,
    assert_matches_truth,
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
