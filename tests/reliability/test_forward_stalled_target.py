"""Forwarding is never in the callback's path: a target that accepts connections and never answers
slows neither the callbacks nor enrichment.

The subscription wants every event (message.status too, so the callback request itself writes
outbox rows). While the worker (`python -m receiver worker`) keeps trying the stalled target, a
mailing through the TWIN simulator is stored and enriched as usual, and callbacks posted meanwhile
are answered in a few milliseconds: each forwarding turn of the worker is bounded by FORWARD_TIMEOUT
and FORWARD_BATCH, and the callback only writes a row.
"""
from __future__ import annotations

import statistics
import time

import requests

from receiver import create_app, forwarding
from receiver.db import db
from receiver.models import Delivery, DeliveryAttempt, Message, Subscription

from ..support import (
    CALLBACK_TOKEN,
    LiveServer,
    StalledTarget,
    assert_matches_truth,
    callback_body,
    kill_if_running,
    make_secret,
    phones,
    send_mailing,
    settings_env,
    settings_for,
    start_worker,
    stop_worker,
    wait_for,
)

TIMEOUT = 5.0           # FORWARD_TIMEOUT: every POST to the stalled target takes this long, then fails
CALLBACKS = 60


def settled(ids: list[str]) -> bool:
    return not Message.select().where(Message.id.in_(ids), Message.stage.not_in(["done", "given_up"])).exists()


def post_callback(http, base_url: str, message_id: str) -> float:
    """POST a status callback to the receiver; the seconds it took to be answered 200."""
    began = time.monotonic()
    answer = http.post(f"{base_url}/callbacks/{CALLBACK_TOKEN}", timeout=30,
                       json=callback_body(message_id=message_id, old="CREATED", new="PENDING"))
    assert answer.status_code == 200, answer.text
    return time.monotonic() - began


def test_a_target_that_never_answers_slows_neither_callbacks_nor_enrichment(database_url, twin, tmp_path):
    target = StalledTarget().start()
    settings = settings_for(
        twin, database_url, forward_url=target.url, forward_secret=make_secret("stalled"), forward_timeout=TIMEOUT,
        forward_events="message.result,message.status,message.given_up")
    server = LiveServer(create_app(settings)).start()
    db.connect(reuse_if_open=True)
    log_path = tmp_path / "worker.log"
    env = settings_env(settings) | {"ENRICH_POLL_INTERVAL": "0.05", "FORWARD_POLL_INTERVAL": "0.05"}
    worker = start_worker(env, log_path)
    try:
        # The worker makes the FORWARD_URL subscription as it starts; this process (the receiver's web
        # side) reads it afresh rather than from what an earlier test left in its cache.
        assert wait_for(lambda: Subscription.select().exists(), timeout=15)
        forwarding.forget_wants()
        # The worker is stuck on the target from the first event on (a status callback's).
        http = requests.Session()
        post_callback(http, server.url, "direct-0")
        assert wait_for(lambda: target.connections, timeout=15), log_path.read_text(errors="replace")[-3000:]

        # Callbacks meanwhile: each answered at once, each writing its message.status event.
        seconds = [post_callback(http, server.url, f"direct-{n}") for n in range(1, CALLBACKS)]
        assert statistics.median(seconds) < 0.25 and max(seconds) < TIMEOUT / 2, seconds

        # A mailing meanwhile is stored and enriched as usual: within a few seconds, while every POST
        # to the target takes FORWARD_TIMEOUT and a forwarding turn of FORWARD_BATCH events far longer.
        started = time.monotonic()
        ids = send_mailing(twin, server.url, phones(30), callback_data="stalled-target")
        assert wait_for(lambda: twin.idle() and settled(ids), timeout=TIMEOUT, interval=0.1), \
            log_path.read_text(errors="replace")[-3000:]
        enriched_in = time.monotonic() - started
        # A stop waits FORWARD_TIMEOUT + 5 s for the forwarding turn at most (its leases then expire).
        assert stop_worker(worker) == 0
    finally:
        kill_if_running(worker)
        server.stop()
        target.stop()

    assert_matches_truth(twin, {m.id: m for m in Message.select()}, ids)
    direct = Delivery.select().where(Delivery.message_id.startswith("direct-"),
                                     Delivery.event_type == "message.status").count()
    assert direct == CALLBACKS, "each callback wrote its message.status event, in the callback's transaction"
    assert Delivery.select().where(Delivery.event_type == "message.result").exists()
    assert not Delivery.select().where(Delivery.state == "delivered").exists()
    attempts = list(DeliveryAttempt.select())
    assert attempts and all(a.status_code is None and a.error for a in attempts), attempts[:3]
    assert max(a.seconds for a in attempts) < TIMEOUT + 1.5, "a POST outlived FORWARD_TIMEOUT"
    print(f"\nstalled target ({database_url.split(':')[0]}): callbacks median {statistics.median(seconds) * 1000:.1f} ms,"
          f" max {max(seconds) * 1000:.1f} ms; enriched in {enriched_in:.1f} s; {len(attempts)} attempts timed out;"
          f" {len(target.connections)} connections stalled")
    db.close()
