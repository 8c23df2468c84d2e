"""TWIN24_MAX_CALLS_PER_MINUTE: the TWIN calls of every worker on one database, against the ceiling.

The simulator records when each call arrived; no sliding 60 s of them may hold more than the ceiling,
however much the work would want, and the work must still be done.
"""
from __future__ import annotations

import datetime as dt
import signal

from receiver.callbudget import CallBudget
from receiver.db import utcnow
from receiver.models import Message
from receiver.simulator import most_calls_within

from .support import (
    all_settled,
    assert_matches_truth,
    phones,
    send_mailing,
    settings_env,
    start_worker,
    wait_for,
)

RECEIVER_CALLS = ("login", "refresh", "messages_stats", "sessions_stats", "send")


def test_two_workers_together_never_exceed_the_ceiling_and_finish_the_work(settings, twin, live_app, tmp_path):
    # Pages of 2 items: 8 messages want 4 message-statistics pages and 4 session pages per sweep, and
    # each worker logs in: more calls than the ceiling allows in one minute.
    ceiling = 5
    twin.configure(page_cap=2, result_after=(0.3, 0.6))
    ids = send_mailing(twin, live_app.url, phones(8))
    assert twin.wait_idle(timeout=20)
    env = settings_env(settings) | {"TWIN24_MAX_CALLS_PER_MINUTE": str(ceiling), "ENRICH_POLL_INTERVAL": "0.1",
                                    "TWIN24_LOGIN": twin.login, "TWIN24_PASSWORD": twin.password}
    del env["TWIN24_TOKEN"]     # log in, so that auth calls count as well
    before = len(twin.call_times())       # the test's own send

    workers = [start_worker(env, tmp_path / f"worker-{n}.log") for n in range(2)]
    try:
        settled = wait_for(all_settled, timeout=300, interval=0.5)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=30)

    assert settled, (tmp_path / "worker-0.log").read_text()[-3000:]
    assert_matches_truth(twin, {m.id: m for m in Message.select()}, ids)
    times = twin.call_times(RECEIVER_CALLS)[before:]
    assert len(times) > ceiling, "the work wanted more than one minute's calls"
    assert most_calls_within(times, 60.0) <= ceiling, times


def test_a_full_minute_makes_the_next_call_wait_and_sends_keep_their_headroom(app):
    now = utcnow()
    budget = CallBudget(20, clock=lambda: now)          # 18 for statistics and auth, 20 for sends

    taken = [budget.try_reserve("messages_stats") for _ in range(18)]
    assert taken == [0.0] * 18
    assert budget.free() == 0
    assert budget.try_reserve("sessions_stats") > 60, "the oldest slot frees a minute (and a second) after it"
    assert budget.try_reserve("send") == 0.0, "a send still has the headroom the statistics leave"

    later = CallBudget(20, clock=lambda: now + dt.timedelta(seconds=62))
    assert later.free() == 18, "a minute on, every slot is free again"
    assert later.try_reserve("sessions_stats") == 0.0
