"""What an operator sees of the webhooks: `python -m receiver forwards list|add|remove|retry|replay`,
`status`, GET/POST /api/forwards, /metrics and the results page's Webhooks box.

The events are real: messages stored through the callback endpoint, their results' events written by
forwarding.emit and delivered over HTTP to local targets (one that verifies signatures with the
`standardwebhooks` package and answers 200, one that answers 500)."""
from __future__ import annotations

import base64
import dataclasses
import re

import pytest
from standardwebhooks import Webhook

from receiver import forwarding
from receiver.db import write_transaction
from receiver.models import Delivery, Subscription

from .support import (
    API_TOKEN,
    LiveServer,
    RecordingTarget,
    answer,
    basic,
    make_secret,
    run_command,
    scrape,
    seed,
    value,
)

GOOD_SECRET = make_secret("the good target")


def failing_target(environ, start_response):
    start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
    return [b"down"]


@pytest.fixture
def targets():
    good, bad = RecordingTarget(GOOD_SECRET).start(), LiveServer(failing_target).start()
    yield good, bad
    good.stop()
    bad.stop()


def deliver(settings) -> None:
    """The worker's turn; a failure is dead at once (FORWARD_MAX_AGE 1 s, the next try 30 s away)."""
    quick_death = dataclasses.replace(settings, forward_max_age=1.0, forward_backoff_start=60.0,
                                      forward_backoff_max=60.0, forward_timeout=5.0)
    while forwarding.deliver_due(quick_death):
        pass


@pytest.fixture
def forwarded(settings, app, client, targets):
    """#1: the good target, for callbackData mailing-1 only; #2: the failing one, every message.
    Three answered messages of mailing-1 and one of another mailing: #1 gets 3 events, #2 4 dead ones."""
    good, bad = targets
    added = run_command(settings, "forwards", "add", good.url, "--secret", GOOD_SECRET, "--callback-data", "mailing-1")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("subscription #1: ") and "secret" not in added.stdout
    generated = run_command(settings, "forwards", "add", f"{bad.url}/hooks")
    assert generated.returncode == 0, generated.stderr
    secret = re.search(r"secret \(shown this once.*\): (whsec_\S+)", generated.stdout).group(1)
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    Webhook(secret)                                  # the standard library takes it
    ids = seed(client, 3) + seed(client, 1, prefix="o", callback_data="other")
    for message_id in ids:
        answer(message_id, {"confirmation": "Да"})
    with write_transaction():
        assert forwarding.emit("message.result", ids) == 7
    deliver(settings)
    return ids


def test_add_refuses_what_would_never_deliver(settings, app):
    bad_url = run_command(settings, "forwards", "add", "ftp://example.com/hooks")
    bad_events = run_command(settings, "forwards", "add", "https://example.com/hooks", "--events", "message.sent")
    bad_secret = run_command(settings, "forwards", "add", "https://example.com/hooks", "--secret", "hunter2")
    assert [r.returncode for r in (bad_url, bad_events, bad_secret)] == [2, 2, 2]
    assert "an http:// or https:// URL" in bad_url.stderr
    assert "known events: message.result, message.status, message.given_up" in bad_events.stderr
    assert "whsec_" in bad_secret.stderr
    assert Subscription.select().count() == 0


def test_list_shows_each_subscription_and_the_dead_events(settings, forwarded, targets):
    good, bad = targets
    assert sorted(d["body"]["data"]["message_id"] for d in good.deliveries()) == forwarded[:3]

    listed = run_command(settings, "forwards", "list", "--dead")

    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[:8] == [
        f"#1 {good.url}",
        "    events: message.given_up, message.result",
        "    filter: callbackData = 'mailing-1'",
        "    pending 0, delivered 3, dead 0, oldest pending -",
        f"#2 {bad.url}/hooks",
        "    events: message.given_up, message.result",
        "    filter: none (every message)",
        "    pending 0, delivered 0, dead 4, oldest pending -",
    ]
    assert lines[8] == "dead events:"
    dead = lines[9:]
    assert len(dead) == 4
    for line, message_id in zip(dead, forwarded, strict=True):
        assert re.fullmatch(rf"  evt_[0-9a-f]{{32}} #2 message.result message {message_id} at \S+ \S+ UTC: "
                            r"1 attempts, last HTTP 500 \(HTTP 500\)", line), line


def test_retry_and_replay_send_the_same_event_ids_again(settings, forwarded, targets):
    good, _ = targets
    dead = list(Delivery.select().where(Delivery.state == "dead").order_by(Delivery.id))

    retried = run_command(settings, "forwards", "retry", "--id", dead[0].event_id)
    assert retried.stdout.strip() == "1 dead events are pending again", retried.stderr
    listed = run_command(settings, "forwards", "list").stdout.splitlines()
    assert re.fullmatch(r"    pending 1, delivered 0, dead 3, oldest pending \d+ s", listed[7]), listed[7]
    assert run_command(settings, "forwards", "retry").returncode == 2          # says what to retry

    first = {d["body"]["data"]["message_id"]: d["id"] for d in good.deliveries()}
    replayed = run_command(settings, "forwards", "replay", "--subscription", "1", "--message", forwarded[1])
    assert replayed.stdout.strip() == "1 delivered events are pending again", replayed.stderr
    deliver(settings)
    again = good.deliveries()[3:]
    assert [(d["body"]["data"]["message_id"], d["id"]) for d in again] == [(forwarded[1], first[forwarded[1]])]


def test_status_prints_the_webhooks(settings, forwarded, targets):
    good, bad = targets
    run = run_command(settings, "status")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    start = lines.index("webhooks:")
    assert lines[start + 1:start + 3] == [
        f"  #1 {good.url}: pending 0, delivered 3, dead 0, oldest pending -",
        f"  #2 {bad.url}/hooks: pending 0, delivered 0, dead 4, oldest pending -"]


def test_status_without_subscriptions(settings, app):
    assert "webhooks: none (docs/forwarding.md)" in run_command(settings, "status").stdout.splitlines()


def test_remove_deletes_a_subscription_and_its_events(settings, forwarded):
    removed = run_command(settings, "forwards", "remove", "2")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip().endswith("and its 4 events")
    assert [s.id for s in Subscription.select()] == [1]
    assert Delivery.select().where(Delivery.subscription == 2).count() == 0
    assert run_command(settings, "forwards", "remove", "2").returncode == 1


def test_the_api_counts_retries_and_replays(client, forwarded, targets, api_headers):
    good, bad = targets
    assert client.get("/api/forwards").status_code == 401
    assert client.post("/api/forwards/retry", json={"subscription": 2}, headers={
        "Authorization": "Bearer test-send-token-0123456789abcdef"}).status_code == 401    # SEND_TOKEN: no

    listed = client.get("/api/forwards", headers=api_headers).get_json()["subscriptions"]
    assert [(s["id"], s["url"], s["pending"], s["delivered"], s["dead"], s["oldest_pending_seconds"], s["paused"])
            for s in listed] == [(1, good.url, 0, 3, 0, None, False), (2, f"{bad.url}/hooks", 0, 0, 4, None, False)]

    dead_event = Delivery.select().where(Delivery.state == "dead").order_by(Delivery.id).first().event_id
    one = client.post("/api/forwards/retry", json={"ids": [dead_event, "evt_nobody"]}, headers=api_headers)
    assert one.status_code == 200 and one.get_json() == {"retried": 1}
    rest = client.post("/api/forwards/retry", json={"subscription": 2, "since": "2000-01-01"}, headers=api_headers)
    assert rest.get_json() == {"retried": 3}
    replayed = client.post("/api/forwards/replay", json={"messages": forwarded[:2]}, headers=api_headers)
    assert replayed.get_json() == {"replayed": 2}
    after = client.get("/api/forwards", headers=api_headers).get_json()["subscriptions"]
    assert [(s["pending"], s["delivered"], s["dead"]) for s in after] == [(2, 1, 0), (4, 0, 0)]
    assert all(s["oldest_pending_seconds"] >= 0 for s in after)


@pytest.mark.parametrize("body, parameter", [
    ({}, None), ({"subscription": "2"}, "subscription"), ({"ids": []}, "ids"), ({"since": "yesterday"}, "since"),
    ({"everything": True}, "everything")])
def test_the_api_refuses_a_body_that_says_nothing_clear(client, api_headers, body, parameter):
    answer_ = client.post("/api/forwards/retry", json=body, headers=api_headers)
    assert answer_.status_code == 400
    assert answer_.get_json().get("parameter") == parameter


def test_metrics_per_subscription(client, forwarded):
    Delivery.update(state="pending").where(Delivery.subscription == 2).execute()
    samples = scrape(client)
    assert value(samples, "receiver_forward_deliveries", subscription="1", state="delivered") == 3
    assert value(samples, "receiver_forward_deliveries", subscription="1", state="pending") == 0
    assert value(samples, "receiver_forward_deliveries", subscription="2", state="pending") == 4
    assert value(samples, "receiver_forward_oldest_pending_seconds", subscription="1") == 0
    assert value(samples, "receiver_forward_oldest_pending_seconds", subscription="2") > 0


def test_the_results_page_shows_a_webhooks_box(client, forwarded):
    html = client.get("/results", headers=basic(API_TOKEN)).get_data(as_text=True)
    assert 'id="webhooks"' in html
    row = re.search(r'<tr class="webhook" data-subscription="2">(.*?)</tr>', html, re.S).group(1)
    assert '<td class="pending">0</td>' in row and '<td class="dead">4</td>' in row
    assert '<td class="state">active</td>' in row


def test_the_results_page_has_no_webhooks_box_without_subscriptions(client):
    assert 'id="webhooks"' not in client.get("/results", headers=basic(API_TOKEN)).get_data(as_text=True)
