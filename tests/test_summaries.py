"""Stored summaries (receiver/summaries.py): what the page, the summary API, /metrics and exports read once
the worker has counted the mailings; the same numbers as counting live, as of the last round."""
from __future__ import annotations

import base64
import datetime as dt
import json

from prometheus_client.parser import text_string_to_metric_families

from receiver import results, summaries
from receiver.db import utcnow
from receiver.maintenance import PeriodicSummaries
from receiver.models import STAGE_CHAT_ID, STAGE_DONE, STAGE_GIVEN_UP, MailingSummary, Message

from .support import API_TOKEN, answer, callback, seed


def summary(client, api_headers, **query) -> dict:
    return client.get("/api/results/summary", query_string=query, headers=api_headers).get_json()


def two_mailings(client) -> list[str]:
    ids = seed(client, 4, callback_data="spring", bulk_id="bulk-a")
    seed(client, 2, prefix="f", callback_data="spring", bulk_id="bulk-b", status="UNDELIVERED")
    seed(client, 3, prefix="a", callback_data="autumn", bulk_id="bulk-c")
    seed(client, 1, prefix="n", callback_data=None, bulk_id=None)       # known from nowhere in particular
    answer(ids[0], {"confirmation": "Да", "nps": "9", "choice": ["a", "b"]})
    answer(ids[1], {"confirmation": "Нет", "nps": "3"})
    answer("a00000", {"confirmation": "Да", "profile": {"city": "Тверь"}})
    # The others' bots never answered: enrichment gave up on them (settled, like the mailings of past days).
    Message.update(stage=STAGE_GIVEN_UP).where(Message.stage == STAGE_CHAT_ID).execute()
    return ids


QUERIES = ({}, {"callbackData": "spring"}, {"callbackData": "autumn"}, {"bulkId": "bulk-a"},
           {"bulkId": "bulk-b"})


def test_stored_summaries_give_what_counting_live_gives(client, api_headers):
    two_mailings(client)
    live = {json.dumps(q): summary(client, api_headers, **q) for q in QUERIES}
    assert all(body["as_of"] is None for body in live.values())           # no round yet: counted now
    assert summaries.refresh() == 5                 # spring, autumn, bulk-a, bulk-b, bulk-c
    for query in QUERIES:
        stored = summary(client, api_headers, **query)
        assert stored.pop("as_of").endswith("Z")
        expected = live[json.dumps(query)]
        expected.pop("as_of")
        assert stored == expected, query
    assert summary(client, api_headers)["funnel"] == {"sent": 10, "delivered": 8, "session_started": 3,
                                                      "answered": 3, "failed": 2}


def test_a_filter_beyond_one_mailing_is_counted_live(client, api_headers):
    two_mailings(client)
    summaries.refresh()
    body = summary(client, api_headers, callbackData="spring", status="UNDELIVERED")
    assert body["as_of"] is None and body["funnel"]["sent"] == 2
    both = summary(client, api_headers, callbackData="spring", bulkId="bulk-a")
    assert both["as_of"] is None and both["funnel"]["sent"] == 4


def later(minutes: int) -> dt.datetime:
    """A round's start `minutes` from now: past the SLACK that makes a round look again at the last minute."""
    return utcnow() + dt.timedelta(minutes=minutes)


def test_changes_show_after_the_next_round_and_only_changed_mailings_are_counted(client, api_headers):
    two_mailings(client)
    seed(client, 1, prefix="p", callback_data="spring", bulk_id="bulk-a", status="PENDING")
    summaries.refresh(later(5))
    counted_at = {row.key: row.counted_at for row in MailingSummary.select()}
    # Only the mailing with a message in flight (spring, bulk-a) is counted again; the settled ones stay.
    assert summaries.refresh(later(10)) == 2

    callback(client, "late00000", callback_data="spring", bulk_id="bulk-a")      # a new message
    callback(client, "p00000", callback_data="spring", bulk_id="bulk-a", old_status="PENDING")
    before = summary(client, api_headers, callbackData="spring")
    assert before["funnel"]["sent"] == 7 and before["statuses"]["PENDING"] == 1  # as of the last round

    assert summaries.refresh(later(15)) == 2        # spring and bulk-a again
    after = summary(client, api_headers, callbackData="spring")
    assert after["funnel"]["sent"] == 8 and "PENDING" not in after["statuses"]
    assert after["statuses"]["DELIVERED"] == 6
    assert summary(client, api_headers)["funnel"]["sent"] == 12
    unchanged = summaries.unit_key(summaries.CALLBACK_DATA, "autumn")
    assert MailingSummary.get_by_id(unchanged).counted_at == counted_at[unchanged]


def test_a_mailing_with_open_messages_is_counted_again_until_settled(client, api_headers):
    ids = seed(client, 2, callback_data="open", bulk_id="bulk-o")
    Message.update(stage=STAGE_CHAT_ID).where(Message.id.in_(ids)).execute()    # enrichment under way
    summaries.refresh(later(5))
    assert MailingSummary.get_by_id(summaries.unit_key(summaries.CALLBACK_DATA, "open")).open == 2
    # Enrichment finds the answer: no callback, no event, yet the next round sees it.
    answer(ids[0], {"confirmation": "Да"})
    Message.update(stage=STAGE_DONE).where(Message.id == ids[1]).execute()
    assert summaries.refresh(later(10)) == 2        # open and bulk-o
    assert summary(client, api_headers, callbackData="open")["funnel"]["answered"] == 1
    assert summaries.refresh(later(15)) == 0        # settled: frozen


def test_the_worker_counts_a_few_mailings_per_turn(client, api_headers):
    for n in range(3):
        seed(client, 1, prefix=f"w{n}", callback_data=f"mailing-{n}", bulk_id=f"bulk-{n}")
    periodic = PeriodicSummaries(units_per_pass=4, interval=3600)
    assert periodic.run_if_due() == 4
    assert summaries.as_of() is None                # the round is not over: readers still count live
    assert periodic.run_if_due() == 2
    assert summaries.as_of() is not None
    assert periodic.run_if_due() == 0               # the next round waits for its interval
    assert summary(client, api_headers)["funnel"]["sent"] == 3


def test_the_page_says_how_old_its_counts_are(client):
    two_mailings(client)
    headers = {"Authorization": "Basic " + base64.b64encode(f"me:{API_TOKEN}".encode()).decode()}
    live = client.get("/results", headers=headers).get_data(as_text=True)
    assert 'id="as-of"' not in live
    summaries.refresh()
    page = client.get("/results?mailing=c:spring", headers=headers).get_data(as_text=True)
    assert 'id="as-of"' in page and "Counts as of" in page
    assert '<dd id="count-sent">6</dd>' in page
    assert ">spring (6)</option>" in page and ">bulk-c (3)</option>" in page      # the list of mailings


def gauges(client) -> dict:
    text = client.get("/metrics").get_data(as_text=True)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_read_the_stored_counts(app, client):
    two_mailings(client)
    app.extensions.pop("receiver_database_metrics", None)
    summaries.refresh()
    samples = gauges(client)
    assert samples[("receiver_messages", (("stage", "done"),))] == 3
    assert samples[("receiver_messages", (("stage", "given_up"),))] == 5
    assert samples[("receiver_messages", (("stage", "none"),))] == 2
    assert samples[("receiver_messages_by_outcome", (("outcome", "failed"),))] == 2
    assert samples[("receiver_messages_by_outcome", (("outcome", "delivered"),))] == 8
    assert samples[("receiver_results_counted_timestamp_seconds", ())] > 1_700_000_000


def test_exports_take_their_result_columns_from_the_stored_counts(client, api_headers):
    two_mailings(client)
    summaries.refresh()
    text = client.get("/api/results.csv?callbackData=autumn", headers=api_headers).get_data(as_text=True)
    header = text.splitlines()[0].split(",")
    assert header[-2:] == ["result.confirmation", "result.profile.city"]
    assert summaries.result_keys(results.Filters(status=("DELIVERED",))) is None    # found live instead
