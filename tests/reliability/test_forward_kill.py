"""The worker killed with SIGKILL mid-delivery, again and again, while a mailing's results are forwarded.

A mailing goes to the TWIN simulator with the receiver (over real HTTP) as its callbackUrl; the worker
(`python -m receiver worker`, FORWARD_URL and FORWARD_SECRET in its environment) enriches the messages
and forwards each event (the callbacks' `message.status` too) to a local target that verifies every signature with the
`standardwebhooks` package and records every delivery. The target holds each request open for a
moment, and the worker is killed while one is held (each time a delivery not caught before), then
started again at once.

Afterwards, as the target saw it:
* every delivery verified; every event of the outbox arrived, none that the outbox does not hold;
* an event that arrived twice (the kills make sure some do) came with the same webhook-id and the
  same body: never the same event under two ids;
* the events of one message arrived in the order they were made;
* every message the bot answered has its `message.result` with the result TWIN has.
"""
from __future__ import annotations

import datetime as dt
import json
import signal
import time
from collections import Counter, defaultdict

from receiver import create_app, forwarding
from receiver.db import db, utcnow
from receiver.models import Delivery, Message, Subscription

from ..support import (
    LiveServer,
    RecordingTarget,
    assert_matches_truth,
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

SECRET = make_secret("forward-kill")
MESSAGES = 30
KILLS = 4
HOLD = 0.3          # seconds the target holds each request open while kills are to come
LEASE = 2.0         # ENRICH_LEASE of the workers



def kill(worker) -> None:
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    # The dead worker's leases would hold for their full length; nobody else is delivering: let them
    # run out now, as if that time had passed. What it left in flight is the next worker's to send.
    Delivery.update(lease_until=utcnow() - dt.timedelta(seconds=1)).where(
        Delivery.lease_until.is_null(False)).execute()


def all_done(twin) -> bool:
    settled = Message.select().where(Message.stage.not_in(["done", "given_up"])).count() == 0
    pending = Delivery.select().where(Delivery.state == "pending").exists()
    return settled and not pending and twin.idle()


def result_of(data: dict):
    """The result of a results-view row as JSON (stored as JSON text; a body may carry it parsed)."""
    result = data.get("result")
    return json.loads(result) if isinstance(result, str) else result


def test_worker_killed_mid_delivery_again_and_again_loses_no_event(database_url, twin, tmp_path):
    target = RecordingTarget(SECRET, hold=HOLD).start()
    settings = settings_for(
        twin, database_url, forward_url=target.url, forward_secret=SECRET, forward_timeout=5.0,
        forward_events="message.result,message.status,message.given_up")
    server = LiveServer(create_app(settings)).start()
    db.connect(reuse_if_open=True)
    log_path = tmp_path / "worker.log"
    env = settings_env(settings) | {"ENRICH_LEASE": str(LEASE), "ENRICH_POLL_INTERVAL": "0.05",
                                    "FORWARD_POLL_INTERVAL": "0.05"}
    worker = start_worker(env, log_path)
    try:
        # The worker makes the FORWARD_URL subscription as it starts; this process (the receiver's web
        # side, which writes the message.status events) reads it afresh, not from an earlier test's cache.
        assert wait_for(lambda: Subscription.select().exists(), timeout=15)
        forwarding.forget_wants()
        ids = send_mailing(twin, server.url, phones(MESSAGES), callback_data="forward-kill")

        # Killed the moment a delivery not caught before is held open by the target, restarted at once.
        caught: set[str] = set()
        deadline = time.monotonic() + 30
        while len(caught) < KILLS:
            assert time.monotonic() < deadline, (
                f"only {len(caught)} kills mid-delivery", Counter(d.state for d in Delivery.select()),
                log_path.read_text(errors="replace")[-3000:])
            held = target.held() - caught
            if not held:
                time.sleep(0.01)
                continue
            kill(worker)
            caught |= held
            worker = start_worker(env, log_path)
        target.hold = 0.0

        finished = wait_for(lambda: all_done(twin), timeout=30, interval=0.2)
        assert finished, (Counter(d.state for d in Delivery.select()),
                          Counter(m.stage for m in Message.select()),
                          log_path.read_text(errors="replace")[-3000:])
        assert stop_worker(worker) == 0
    finally:
        kill_if_running(worker)
        server.stop()
        target.stop()

    received = target.deliveries()
    outbox = {d.event_id: d for d in Delivery.select().order_by(Delivery.id)}
    assert not target.refused, target.refused
    # A body cut short by a kill fails verification (rightly); that event came again, whole.
    assert set(target.torn) <= {r["id"] for r in target.deliveries()}
    assert {d.state for d in outbox.values()} == {"delivered"}

    # No event lost, none invented.
    assert {r["id"] for r in received} == set(outbox)

    # Duplicates only with the same webhook-id: same body every time, the id the body names, and never
    # the same event (type, message, data) under two ids.
    bodies = defaultdict(set)
    for r in received:
        assert r["body"]["id"] == r["id"], r
        bodies[r["id"]].add(r["raw"])
    assert all(len(raws) == 1 for raws in bodies.values()), {i: raws for i, raws in bodies.items() if len(raws) > 1}
    contents = Counter(json.dumps([b["type"], b["data"]], sort_keys=True)
                       for b in (json.loads(next(iter(raws))) for raws in bodies.values()))
    assert max(contents.values()) == 1, [c for c, n in contents.items() if n > 1]
    twice = {i for i, n in Counter(r["id"] for r in received).items() if n > 1}
    assert caught <= twice, f"a delivery caught by a kill was not sent again: {caught - twice}"

    # Per message, in the order the events were made (an event again right after itself is fine).
    order = {event_id: n for n, event_id in enumerate(outbox)}
    per_message = defaultdict(list)
    for r in received:
        per_message[r["body"]["data"]["message_id"]].append(order[r["id"]])
    for message_id, sequence in per_message.items():
        assert sequence == sorted(sequence), (message_id, sequence)

    # Every message the bot answered: its message.result came, and the last one carries TWIN's result.
    assert_matches_truth(twin, {m.id: m for m in Message.select()}, ids)
    last_result = {}
    for r in received:
        if r["body"]["type"] == "message.result":
            last_result[r["body"]["data"]["message_id"]] = result_of(r["body"]["data"])
    answered = {t["id"]: t["result"] for t in twin.truth()
                if t["finalStatus"] == "DELIVERED" and t["result"] is not None}
    assert answered, "the bot answered nobody"
    for message_id, result in answered.items():
        assert last_result.get(message_id) == result, (message_id, last_result.get(message_id), result)
    print(f"\nforward kill ({database_url.split(':')[0]}): {KILLS} kills mid-delivery, {len(outbox)} events, "
          f"{len(received)} deliveries ({len(twice)} events twice or more)")
    db.close()
