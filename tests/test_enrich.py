"""Enrichment against the TWIN simulator over real HTTP: chat session ids and the bot's results.

Each test sends a mailing to the simulator with the live receiver as callbackUrl, lets the
callbacks arrive, runs the enrichment loop, and compares what the receiver stored with the
simulator's ground truth.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from receiver.enrich import MESSAGES_SWEEP, Enricher
from receiver.models import Message
from receiver.worker import Worker

from .support import LiveServer, assert_matches_truth, phones, send_mailing, settings_for, wait_for


@pytest.fixture
def enricher(app):
    return Worker.from_app(app).enricher


def enricher_with(app, **changes) -> Enricher:
    """An enricher of this app whose settings differ by `changes`."""
    settings = app.config["SETTINGS"]
    return Enricher(dataclasses.replace(settings, **changes), Worker.from_app(app).client)


def enrich_until_settled(enricher, count, timeout=30.0):
    """Run the loop until `count` messages are done or given up; their rows."""
    settled = Message.stage.in_(["done", "given_up"])
    wait_for(lambda: Message.select().where(settled).count() >= count,
             step=lambda: enricher.run_once(force=True), timeout=timeout)
    return {m.id: m for m in Message.select()}


def test_a_clean_mailing_gets_every_chat_id_and_result(twin, live_app, enricher):
    ids = send_mailing(twin, live_app.url, phones(40))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 40)

    assert_matches_truth(twin, stored, ids)
    assert {m.stage for m in stored.values()} == {"done"}
    calls = twin.calls()
    assert sum(calls["messages_stats"].values()) <= 4, calls
    assert sum(calls["sessions_stats"].values()) <= 4, calls


def test_duplicate_and_reordered_callbacks_change_nothing(twin, live_app, enricher):
    twin.configure(duplicate_callbacks=0.5, reorder_callbacks=0.7)
    ids = send_mailing(twin, live_app.url, phones(30))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 30)

    assert_matches_truth(twin, stored, ids)


def test_statistics_that_lag_behind_callbacks_are_waited_for(twin, live_app, enricher):
    twin.configure(stats_lag=1.0)
    ids = send_mailing(twin, live_app.url, phones(10))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 10)

    assert_matches_truth(twin, stored, ids)
    assert all(m.chat_id_at > m.delivered_at for m in stored.values())


def test_a_result_that_comes_late_is_picked_up(twin, live_app, enricher):
    twin.configure(result_after=(1.0, 1.5), session_close_after=5.0)
    ids = send_mailing(twin, live_app.url, phones(8))
    assert twin.wait_idle(timeout=20)

    enricher.run_once(force=True)
    waiting = Message.select().where(Message.stage == "result").count()
    stored = enrich_until_settled(enricher, 8)

    assert waiting == 8, "right after delivery the sessions exist but the bot has not answered"
    assert_matches_truth(twin, stored, ids)


def test_no_reply_is_given_up_after_the_horizon_and_the_view_says_so(twin, app, live_app):
    twin.configure(no_reply_rate=1.0, session_close_after=60.0)
    enricher = enricher_with(app, enrich_result_horizon=1.5)
    send_mailing(twin, live_app.url, phones(5))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 5)

    assert {m.stage for m in stored.values()} == {"given_up"}
    assert all(m.chat_id for m in stored.values()), "the session was found, only the result is missing"
    assert {m.given_up_reason for m in stored.values()} == {"no bot result within 1.5 s"}
    row = Message.raw("select stage, given_up_reason, result from results limit 1").dicts()[0]
    assert row == {"stage": "given_up", "given_up_reason": "no bot result within 1.5 s", "result": None}


def test_a_dialog_closed_without_an_answer_is_given_up_at_once(twin, live_app, enricher):
    twin.configure(no_reply_rate=1.0, session_close_after=0.2)
    send_mailing(twin, live_app.url, phones(4))
    assert twin.wait_idle(timeout=20)

    stored = wait_for(lambda: _settled_after_close(enricher), timeout=10)

    assert {m.given_up_reason for m in stored} == {"the dialog closed without a bot result"}


def _settled_after_close(enricher):
    enricher.run_once(force=True)
    rows = list(Message.select())
    return rows if rows and all(m.stage == "given_up" for m in rows) else None


def test_padded_shuffled_sessions_and_small_pages_are_matched_by_id(twin, live_app, enricher):
    twin.configure(padding_sessions=4, shuffle=True, page_cap=7)
    ids = send_mailing(twin, live_app.url, phones(30))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 30)

    assert_matches_truth(twin, stored, ids)


def test_429_and_5xx_storms_are_ridden_out(twin, live_app, enricher):
    ids = send_mailing(twin, live_app.url, phones(20))
    assert twin.wait_idle(timeout=20)
    twin.configure(error_rate=0.5, rate_limit=3, page_cap=5)

    stored = enrich_until_settled(enricher, 20, timeout=60)

    assert_matches_truth(twin, stored, ids)
    outcomes = {code for endpoint in ("messages_stats", "sessions_stats") for code in twin.calls()[endpoint]}
    assert outcomes & {"500", "502", "503"} and "429" in outcomes, "the storm really happened"


def test_tokens_that_expire_mid_run_are_renewed(database_url, twin):
    from receiver import create_app

    settings = settings_for(twin, database_url, auth="login")
    app = create_app(settings)
    server = LiveServer(app).start()
    try:
        enricher = Worker.from_app(app).enricher
        twin.configure(result_after=(1.0, 1.2))     # results come after the tokens have expired
        ids = send_mailing(twin, server.url, phones(10))
        assert twin.wait_idle(timeout=20)
        enricher.run_once(force=True)
        assert Message.select().where(Message.stage == "result").count() == 10
        twin.expire_tokens()

        stored = enrich_until_settled(enricher, 10)
    finally:
        server.stop()

    assert_matches_truth(twin, stored, ids)
    calls = twin.calls()
    assert calls["login"].get("200", 0) + calls.get("refresh", {}).get("200", 0) >= 2, calls


def test_a_lost_delivered_callback_is_found_in_the_statistics(twin, app, client, callback_path):
    # TWIN cannot reach us at all: only the PENDING callbacks are posted here, by hand.
    twin.configure(callback_retries=0)
    ids = send_mailing(twin, "http://127.0.0.1:9", phones(6))
    assert twin.wait_idle(timeout=20)
    for message_id in ids:
        client.post(callback_path, json={"id": message_id, "oldStatus": "CREATED", "newStatus": "PENDING"})
    Message.update(next_check_at=Message.first_seen_at).execute()

    stored = enrich_until_settled(enricher_with(app, enrich_stale_after=0.0), 6)

    assert_matches_truth(twin, stored, ids)
    assert {m.status for m in stored.values()} == {"DELIVERED"}


def test_undelivered_messages_are_not_looked_up(twin, live_app, enricher):
    twin.configure(undelivered_rate=1.0)
    send_mailing(twin, live_app.url, phones(5))
    assert twin.wait_idle(timeout=20)

    enricher.run_once(force=True)

    assert {(m.status, m.stage, m.next_check_at) for m in Message.select()} == {("UNDELIVERED", "none", None)}
    assert "messages_stats" not in twin.calls() or not twin.calls()["messages_stats"]


def test_a_result_that_changes_while_the_dialog_is_open_is_updated(twin, live_app, enricher):
    twin.configure(close_on_answer=False, session_close_after=60.0, result_after=(0.0, 0.05))
    ids = send_mailing(twin, live_app.url, phones(1))
    assert twin.wait_idle(timeout=20)
    first = wait_for(lambda: Message.get_by_id(ids[0]).result, step=lambda: enricher.run_once(force=True))
    assert Message.get_by_id(ids[0]).stage == "result", "an open dialog may still change its answer"

    session_id = twin.truth()[0]["sessionId"]
    twin.rewrite_result(session_id, {"confirmation": "Передумал", "nps": 10}, close=True)
    stored = enrich_until_settled(enricher, 1)

    assert json.loads(first) != {"confirmation": "Передумал", "nps": 10}
    message = stored[ids[0]]
    assert (message.stage, json.loads(message.result)) == ("done", {"confirmation": "Передумал", "nps": 10})


def test_workers_claiming_at_the_same_moment_never_share_a_message(twin, live_app):
    from concurrent.futures import ThreadPoolExecutor

    from receiver.db import db, utcnow
    from receiver.enrich import MESSAGES_SWEEP, claim_due

    send_mailing(twin, live_app.url, phones(60))
    assert twin.wait_idle(timeout=20)
    now = utcnow()

    def claim(_):
        with db.connection_context():      # each worker thread on its own connection
            return [m.id for m in claim_due(MESSAGES_SWEEP.stages, now, 25, lease_seconds=60)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        claims = list(pool.map(claim, range(4)))

    everything = [message_id for claim in claims for message_id in claim]
    assert len(everything) == len(set(everything)) == 60


def test_an_expired_lease_is_claimed_again(twin, live_app):
    import datetime as dt

    from receiver.db import utcnow
    from receiver.enrich import MESSAGES_SWEEP, claim_due, release
    from receiver.models import Message

    send_mailing(twin, live_app.url, phones(3))
    assert twin.wait_idle(timeout=20)
    crashed = claim_due(MESSAGES_SWEEP.stages, utcnow(), 10, lease_seconds=0.2)

    later = utcnow() + dt.timedelta(seconds=0.5)
    taken_over = claim_due(MESSAGES_SWEEP.stages, later, 10, 60)
    assert {m.id for m in taken_over} == {m.id for m in crashed}

    # The first worker comes back late: what it writes must not free the second one's claim.
    release(crashed, utcnow(), "late")
    leases = {m.lease_until for m in Message.select().where(Message.id.in_([m.id for m in crashed]))}
    assert leases == {taken_over.lease_until}
    assert claim_due(MESSAGES_SWEEP.stages, later, 10, 60) == []


def patient_enricher(settings) -> Enricher:
    """An enricher that only decides when to sweep (it never calls TWIN): statistics pages of 50."""
    changes = dict(enrich_batch_share=0.5, enrich_max_wait=60.0, twin24_page_size=50)
    return Enricher(dataclasses.replace(settings, **changes), client=None)


def test_a_sweep_waits_until_enough_is_due_or_the_oldest_has_waited(settings, client, callback_path):
    import datetime as dt

    from receiver.db import utcnow

    enricher = patient_enricher(settings)

    def post(status, count, start=0):
        for n in range(start, start + count):
            client.post(callback_path, json={"id": f"m-{n}", "oldStatus": "CREATED", "newStatus": status})

    post("PENDING", 40)                                 # a mailing in flight, one page of statistics
    post("DELIVERED", 1)
    assert enricher.worth_sweeping(MESSAGES_SWEEP), "one call for 1 due message: worth it"
    post("PENDING", 60, start=40)                       # now two pages
    assert not enricher.worth_sweeping(MESSAGES_SWEEP), "1 due of a 100-message window: wait"
    post("DELIVERED", 9, start=1)
    assert not enricher.worth_sweeping(MESSAGES_SWEEP), "10 due of a 100-message window: wait"
    post("DELIVERED", 45, start=10)
    assert enricher.worth_sweeping(MESSAGES_SWEEP), "55 due: half the window, worth the calls"

    Message.update(next_check_at=utcnow() + dt.timedelta(hours=1)).where(Message.id != "m-0").execute()
    assert not enricher.worth_sweeping(MESSAGES_SWEEP)
    Message.update(next_check_at=utcnow() - dt.timedelta(seconds=61)).where(Message.id == "m-0").execute()
    assert enricher.worth_sweeping(MESSAGES_SWEEP), "one message waited past ENRICH_MAX_WAIT"


def test_a_small_mailing_after_a_big_one_is_looked_up_at_once(settings, client, callback_path):
    import datetime as dt

    from receiver.db import utcnow

    enricher = patient_enricher(settings)
    for n in range(100):                                # a big mailing, an hour ago, all done
        client.post(callback_path, json={"id": f"big-{n}", "oldStatus": "CREATED", "newStatus": "DELIVERED"})
    hour_ago = utcnow() - dt.timedelta(hours=1)
    Message.update(first_seen_at=hour_ago, stage="done", next_check_at=None).execute()

    for n in range(3):
        client.post(callback_path, json={"id": f"small-{n}", "oldStatus": "CREATED", "newStatus": "DELIVERED"})

    assert enricher.worth_sweeping(MESSAGES_SWEEP), "its window holds 3 messages we know, all due"
    start, _ = enricher.window(MESSAGES_SWEEP, list(Message.select().where(Message.stage == "chat_id")), utcnow())
    assert start.replace(tzinfo=None) > hour_ago, "and it does not reach back to the big mailing"


def test_an_answer_is_kept_when_the_dialog_never_reads_closed(twin, app, live_app):
    # TWIN's word for a closed dialog is our guess: an answered dialog that never reads closed ends
    # done with its last answer at the horizon, not given up.
    twin.configure(close_on_answer=False, session_close_after=600.0, result_after=(0.0, 0.05))
    enricher = enricher_with(app, enrich_result_horizon=1.0)
    ids = send_mailing(twin, live_app.url, phones(3))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 3)

    assert_matches_truth(twin, stored, ids)
    assert {(m.stage, m.given_up_reason) for m in stored.values()} == {("done", None)}


def test_a_message_delivered_long_after_it_was_sent_is_still_found(twin, app, live_app):
    # Message statistics list messages by creation: the window must reach back to the send, however
    # long after it the DELIVERED callback came (here 3 s, against a margin that widens to 2 s).
    twin.configure(final_after=(3.0, 3.2))
    enricher = enricher_with(app, enrich_window_margin=0.25)
    ids = send_mailing(twin, live_app.url, phones(2))
    assert twin.wait_idle(timeout=20)

    stored = enrich_until_settled(enricher, 2)

    assert_matches_truth(twin, stored, ids)


def test_a_long_retry_after_reschedules_the_sweep_instead_of_hammering(twin, live_app, enricher):
    import datetime as dt

    from receiver.db import utcnow

    send_mailing(twin, live_app.url, phones(6))
    assert twin.wait_idle(timeout=20)
    twin.configure(rate_limit=1, retry_after=120, page_cap=2)
    before = utcnow()

    enricher.run_once(force=True)

    calls = twin.calls()["messages_stats"]
    assert calls == {"200": 1, "429": 1}, "told to wait 120 s: not asked again within the sweep"
    waiting = list(Message.select().where(Message.stage == "chat_id"))
    assert waiting, "the second page was refused, so some messages are still looked for"
    assert min(m.next_check_at for m in waiting) >= before + dt.timedelta(seconds=119)
    assert all("120 s" in m.last_error for m in waiting)


def test_a_long_sweep_renews_its_lease(twin, live_app):
    import datetime as dt

    from receiver.db import utcnow
    from receiver.enrich import MESSAGES_SWEEP, claim_due, renew_lease

    send_mailing(twin, live_app.url, phones(3))
    assert twin.wait_idle(timeout=20)
    now = utcnow()
    claimed = claim_due(MESSAGES_SWEEP.stages, now, 10, lease_seconds=60)
    first = claimed.lease_until

    renew_lease(claimed, now + dt.timedelta(seconds=10), 60)
    assert claimed.lease_until == first, "five sixths of the lease left: nothing to do"
    renew_lease(claimed, now + dt.timedelta(seconds=40), 60)

    assert claimed.lease_until == now + dt.timedelta(seconds=100)
    assert {m.lease_until for m in Message.select()} == {claimed.lease_until}
    assert claim_due(MESSAGES_SWEEP.stages, now + dt.timedelta(seconds=70), 10, 60) == [], \
        "past the first lease, the renewed one still holds"


def test_a_delivery_after_giving_up_on_the_status_starts_enrichment(app, twin, client, callback_path):
    import datetime as dt

    from receiver.db import utcnow

    # TWIN never tells us the final status of m-late in time, so we give up on it; its DELIVERED
    # callback comes after all (TWIN retried for hours): enrichment starts from the beginning.
    client.post(callback_path, json={"id": "m-late", "oldStatus": "CREATED", "newStatus": "PENDING"})
    long_ago = utcnow() - dt.timedelta(seconds=5)
    Message.update(next_check_at=long_ago, first_seen_at=long_ago).execute()
    enricher_with(app, enrich_stale_after=0.0, enrich_chat_id_horizon=1.0).run_once(force=True)
    assert Message.get_by_id("m-late").stage == "given_up"

    client.post(callback_path, json={"id": "m-late", "oldStatus": "PENDING", "newStatus": "DELIVERED"})

    message = Message.get_by_id("m-late")
    assert (message.status, message.stage, message.given_up_reason, message.attempts) == \
        ("DELIVERED", "chat_id", None, 0)
    assert message.next_check_at is not None


def test_a_message_not_found_is_looked_at_again_after_a_share_of_its_age(twin, app, live_app):
    import datetime as dt

    from receiver.db import utcnow

    # The statistics lag a minute behind the callbacks: the sweep finds neither chat id.
    twin.configure(stats_lag=60.0)
    send_mailing(twin, live_app.url, phones(2))
    assert twin.wait_idle(timeout=20)
    ids = [m.id for m in Message.select().order_by(Message.id)]
    for message_id, waited in zip(ids, (40, 400), strict=True):
        Message.update(delivered_at=utcnow() - dt.timedelta(seconds=waited)).where(Message.id == message_id).execute()
    before = utcnow()

    enricher_with(app, enrich_recheck_share=0.25, enrich_first_check=1.0, enrich_backoff_max=900.0).run_once(force=True)

    due_in = {m.id: (m.next_check_at - before).total_seconds() for m in Message.select()}
    assert {m.stage for m in Message.select()} == {"chat_id"}
    assert 10 <= due_in[ids[0]] < 12, "a quarter of the 40 s it has waited, not a fixed interval"
    assert 100 <= due_in[ids[1]] < 102, "a quarter of 400 s"
