"""Forwarding results over real HTTP to a local target that verifies every request with the
`standardwebhooks` package (not with our code): signatures, retries, order, 410, secret rotation."""
from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import threading
from collections import defaultdict

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.wrappers import Request, Response

from receiver import forwarding
from receiver.db import db, utcnow, write_transaction
from receiver.models import Delivery, DeliveryAttempt, Message, Subscription
from receiver.worker import Worker

from .support import LiveServer, phones, send_mailing, wait_for


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Target:
    """A webhook receiver: verifies each request with standardwebhooks under every secret it knows, and
    answers what `answers` says next (status, headers), then 200."""

    def __init__(self, *secrets_: str, answers=()):
        self.secrets = secrets_
        self.answers = list(answers)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = LiveServer(self.wsgi)

    def wsgi(self, environ, start_response):
        request = Request(environ)
        body = request.get_data(as_text=True)
        headers = dict(request.headers)
        verified = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                verified.append(secret)
            except WebhookVerificationError:
                pass
        with self.lock:
            status, extra = self.answers.pop(0) if self.answers else (200, {})
            self.requests.append({"id": request.headers.get("webhook-id"), "verified": verified,
                                  "signature": request.headers.get("webhook-signature"),
                                  "body": json.loads(body), "status": status})
        return Response("", status=status, headers=extra)(environ, start_response)

    def acknowledged(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if 200 <= r["status"] < 300]

    def __enter__(self):
        self.server.start()
        self.url = f"{self.server.url}/hooks"
        return self

    def __exit__(self, *exc):
        self.server.stop()


def forwarding_settings(app, target: Target, **changes):
    """The app's settings pointed at the target, with timings short enough for a test."""
    values = dict(forward_url=target.url, forward_secret=target.secrets[0], forward_timeout=2.0,
                  forward_backoff_start=0.02, forward_backoff_max=0.1, forward_batch=50)
    values.update(changes)
    settings = dataclasses.replace(app.config["SETTINGS"], **values)
    forwarding.ensure_settings_subscription(settings)
    return settings


def deliver_all(settings, timeout: float = 20.0) -> None:
    """Run the worker's turn until nothing is pending."""
    pending = Delivery.select().where(Delivery.state == "pending")
    wait_for(lambda: pending.count() == 0, step=lambda: forwarding.deliver_due(settings), timeout=timeout,
             interval=0.02)
    assert pending.count() == 0, list(pending.dicts())


def stored_messages(count: int, callback_data: str = "mailing-1") -> list[str]:
    ids = [f"msg-{n}" for n in range(count)]
    with write_transaction():
        for n, message_id in enumerate(ids):
            Message.create(id=message_id, callback_data=callback_data, phone=phones(count)[n], status="DELIVERED")
    return ids


def emit(event_type: str, ids: list[str]) -> int:
    with write_transaction():
        return forwarding.emit(event_type, ids, utcnow())


def results_view_row(message_id: str) -> dict:
    cursor = db.execute_sql(f"SELECT * FROM results WHERE message_id = {db.obj.param}", (message_id,))
    return dict(zip([c[0] for c in cursor.description], cursor.fetchone(), strict=True))


def test_a_mailing_delivers_one_signed_result_event_per_answered_message(twin, live_app, app):
    with Target(new_secret()) as target:
        settings = forwarding_settings(app, target)
        ids = send_mailing(twin, live_app.url, phones(12))
        assert twin.wait_idle(timeout=20)
        worker = Worker.from_settings(settings)
        settled = Message.stage.in_(["done", "given_up"])
        wait_for(lambda: Message.select().where(settled).count() >= len(ids),
                 step=lambda: worker.run(once=True), timeout=30)
        deliver_all(settings)

        answered = {m.id for m in Message.select().where(Message.result.is_null(False))}
        assert answered
        received = target.acknowledged()
        assert all(r["verified"] for r in received)
        result_events = [r["body"] for r in received if r["body"]["type"] == "message.result"]
        assert sorted(e["data"]["message_id"] for e in result_events) == sorted(answered)
        for event in result_events:
            view = results_view_row(event["data"]["message_id"])
            for column in ("message_id", "callback_data", "phone", "status", "chat_id"):
                assert event["data"][column] == view[column], column
            assert event["data"]["result"] == json.loads(view["result"])
            assert event["id"].startswith("evt_") and event["timestamp"].endswith("Z")
        given_up = {m.id for m in Message.select().where(Message.stage == "given_up")}
        assert {r["body"]["data"]["message_id"] for r in received
                if r["body"]["type"] == "message.given_up"} == given_up


def test_a_failing_target_gets_every_event_once_and_in_order(app):
    answers = [(500, {})] * 6 + [(429, {"Retry-After": "1"})] * 2
    with Target(new_secret(), answers=answers) as target:
        settings = forwarding_settings(app, target, forward_events="message.status,message.result,message.given_up")
        ids = stored_messages(4)
        emitted = sum(emit(kind, ids) for kind in ("message.status", "message.result", "message.given_up"))
        assert emitted == 12

        deliver_all(settings)

        received = target.acknowledged()
        assert all(r["verified"] for r in target.requests)
        assert len({r["id"] for r in received}) == len(received) == 12      # each event acknowledged once
        by_message = defaultdict(list)
        for r in received:
            by_message[r["body"]["data"]["message_id"]].append(r["body"]["type"])
        assert by_message == {i: ["message.status", "message.result", "message.given_up"] for i in ids}
        assert any(r["status"] == 429 for r in target.requests)
        assert DeliveryAttempt.select().count() == len(target.requests)
        [row] = forwarding.stats()
        assert (row["pending"], row["delivered"], row["dead"]) == (0, 12, 0)


def test_410_disables_the_subscription(app):
    with Target(new_secret(), answers=[(410, {})]) as target:
        settings = forwarding_settings(app, target)
        ids = stored_messages(1)
        assert emit("message.result", ids) == 1

        forwarding.deliver_due(settings)

        subscription = Subscription.get()
        assert subscription.disabled_at is not None
        assert "410" in subscription.paused_reason
        assert forwarding.deliver_due(settings) == 0
        assert emit("message.result", ids) == 0
        assert len(target.requests) == 1


def test_a_rotated_secret_signs_twice_and_either_secret_verifies(app):
    old, new = new_secret(), new_secret()
    with Target(new, old) as target:
        settings = forwarding_settings(app, target, forward_secret=new, forward_secret_previous=old)
        emit("message.result", stored_messages(2))

        deliver_all(settings)

        assert len(target.requests) == 2
        for r in target.requests:
            assert r["verified"] == [new, old]
            assert len(r["signature"].split(" ")) == 2


def test_dead_events_are_retried_and_delivered_ones_replayed_with_their_ids(app):
    with Target(new_secret(), answers=[(503, {})] * 3) as target:
        settings = forwarding_settings(app, target, forward_max_age=1.0, forward_backoff_start=5.0,
                                       forward_backoff_max=10.0)
        emit("message.result", stored_messages(3))

        forwarding.deliver_due(settings)
        assert Delivery.select().where(Delivery.state == "dead").count() == 3
        assert forwarding.stats()[0]["dead"] == 3

        assert forwarding.retry_dead() == 3
        deliver_all(settings)
        first = {r["body"]["data"]["message_id"]: r["id"] for r in target.acknowledged()}
        assert len(first) == 3

        assert forwarding.replay(message_ids=["msg-1"]) == 1
        deliver_all(settings)
        assert [r["id"] for r in target.acknowledged()][3:] == [first["msg-1"]]


def test_a_target_failing_for_long_is_paused_then_its_backlog_flows(app):
    with Target(new_secret(), answers=[(500, {})] * 6) as target:
        settings = forwarding_settings(app, target, forward_pause_after=0.0, forward_pause_probe=0.3)
        emit("message.result", stored_messages(5))

        assert forwarding.deliver_due(settings) == 5
        subscription = Subscription.get()
        assert subscription.paused_at is not None and "HTTP 500" in subscription.paused_reason
        assert forwarding.stats()[0]["paused_reason"] == subscription.paused_reason
        assert forwarding.deliver_due(settings) == 0                   # paused: no probe yet
        assert wait_for(lambda: forwarding.deliver_due(settings), timeout=2) == 1   # one probe, which fails
        assert Subscription.get().paused_at is not None

        deliver_all(settings)
        assert len(target.acknowledged()) == 5
        assert Subscription.get().paused_at is None


@pytest.mark.parametrize("wanted", [True, False])
def test_status_events_only_when_a_subscription_wants_them(app, client, callback_path, wanted):
    events = "message.status,message.result" if wanted else "message.result"
    with Target(new_secret()) as target:
        settings = forwarding_settings(app, target, forward_events=events)
        forwarding.forget_wants()
        answer = client.post(callback_path, json={"id": "m-1", "oldStatus": "CREATED",
                                                   "newStatus": "DELIVERED", "callbackData": "x"})
        assert answer.status_code == 200
        deliver_all(settings)
        assert [r["body"]["type"] for r in target.requests] == (["message.status"] if wanted else [])


def test_the_worker_thread_delivers_while_it_runs(app):
    with Target(new_secret()) as target:
        settings = forwarding_settings(app, target, forward_poll_interval=0.02)
        forwarder = forwarding.Forwarder(settings)
        forwarder.start()
        try:
            emit("message.result", stored_messages(3))
            assert wait_for(lambda: len(target.acknowledged()) == 3, timeout=10)
        finally:
            forwarder.stop(5)
        assert not forwarder.is_alive()
