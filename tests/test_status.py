"""Statuses: EXPIRED is final and failed like UNDELIVERED and ERROR (never polled as if in flight, counted
as failed), and the metrics say so."""
from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.db import utcnow
from receiver.enrich import apply_messages, claim_due
from receiver.models import STAGE_NONE, Message
from receiver.status import FAILED_STATUSES, is_final, outcome_of, rank_of
from receiver.worker import Worker

from .support import phones, send_mailing

LATER = dt.timedelta(days=30)       # far past any check time a message could have


def post(client, callback_path, message_id, new, old=None, code=None):
    body = {"id": message_id, "oldStatus": old, "newStatus": new, "newStatusCode": code, "callbackData": "срок"}
    answer = client.post(callback_path, json=body)
    assert answer.status_code == 200, answer.json


def claimed_ids(now=None) -> set[str]:
    return {m.id for m in claim_due((STAGE_NONE,), now or utcnow() + LATER, limit=100, lease_seconds=60)}


def test_failed_statuses_are_final_and_rank_together():
    assert FAILED_STATUSES == ("UNDELIVERED", "ERROR", "EXPIRED")
    assert {rank_of(status) for status in FAILED_STATUSES} == {rank_of("UNDELIVERED")}
    assert all(is_final(status) for status in FAILED_STATUSES)
    assert rank_of("EXPIRED") < rank_of("DELIVERED")
    assert [outcome_of(s) for s in ("EXPIRED", "expired", "DELIVERED", "PAUSED", "CREATED", "SOMETHING_NEW")] == \
        ["failed", "failed", "delivered", "in_flight", "in_flight", "other"]


def test_an_expired_message_is_never_checked_or_claimed(client, callback_path):
    post(client, callback_path, "m-expired", "EXPIRED", old="PENDING", code=9)
    post(client, callback_path, "m-pending", "PENDING", old="CREATED", code=2)

    expired = Message.get_by_id("m-expired")
    assert (expired.status, expired.status_code, expired.stage, expired.next_check_at) == (
        "EXPIRED", 9, "none", None)
    assert Message.get_by_id("m-pending").next_check_at is not None
    assert claimed_ids() == {"m-pending"}, "only the one still in flight is looked up"


def test_a_message_in_flight_that_expires_stops_being_checked(client, callback_path):
    post(client, callback_path, "m-1", "PENDING", old="CREATED", code=2)
    assert Message.get_by_id("m-1").next_check_at is not None

    post(client, callback_path, "m-1", "EXPIRED", old="PENDING")

    message = Message.get_by_id("m-1")
    assert (message.status, message.next_check_at) == ("EXPIRED", None)
    assert claimed_ids() == set()
    post(client, callback_path, "m-1", "PENDING", old="CREATED", code=2)      # a late, out-of-order PENDING
    assert Message.get_by_id("m-1").status == "EXPIRED"
    assert claimed_ids() == set()


def test_expired_after_delivered_does_not_undo_the_delivery(client, callback_path):
    post(client, callback_path, "m-1", "DELIVERED", old="PENDING", code=6)
    post(client, callback_path, "m-1", "EXPIRED", old="PENDING")

    assert (Message.get_by_id("m-1").status, Message.get_by_id("m-1").stage) == ("DELIVERED", "chat_id")


def test_statistics_that_say_expired_settle_a_message_stuck_in_flight(settings, client, callback_path):
    post(client, callback_path, "m-1", "PENDING", old="CREATED", code=2)
    now = utcnow()

    apply_messages([{"id": "m-1", "status": "EXPIRED", "providerMessageId": None}], now, settings)

    message = Message.get_by_id("m-1")
    assert (message.status, message.next_check_at) == ("EXPIRED", None)
    assert claimed_ids() == set()


def test_messages_the_simulator_expires_are_not_looked_up(twin, live_app, app):
    twin.configure(expired_rate=1.0)
    send_mailing(twin, live_app.url, phones(4))
    assert twin.wait_idle(timeout=20)

    Worker.from_app(app).enricher.run_once(force=True)

    assert {(m.status, m.stage, m.next_check_at) for m in Message.select()} == {("EXPIRED", "none", None)}
    assert not twin.calls().get("messages_stats")


def scrape(client) -> dict:
    text = client.get("/metrics").get_data(as_text=True)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_expired_as_itself_and_as_failed(client, callback_path):
    before = scrape(client)
    for n, status in enumerate(["EXPIRED", "EXPIRED", "UNDELIVERED", "ERROR", "DELIVERED", "PENDING", "CREATED",
                                "MADE_UP"]):
        post(client, callback_path, f"m-{n}", status)

    after = scrape(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("receiver_callbacks_total", status="EXPIRED") == 2
    assert delta("receiver_callbacks_total", status="other") == 1
    assert {outcome: after[("receiver_messages_by_outcome", (("outcome", outcome),))]
            for outcome in ("delivered", "failed", "in_flight", "other")} == {
        "delivered": 1, "failed": 4, "in_flight": 2, "other": 1}


@pytest.mark.parametrize("body, field", [({"price": "два"}, "price"), ({"partCount": [1]}, "partCount")])
def test_a_field_stored_as_null_is_counted(client, callback_path, body, field):
    key = ("receiver_callback_fields_dropped_total", (("field", field),))
    before = scrape(client).get(key, 0.0)

    assert client.post(callback_path, json={"id": "m-1", "newStatus": "DELIVERED", **body}).status_code == 200

    assert scrape(client)[key] - before == 1
