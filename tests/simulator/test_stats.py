import json
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from .helpers import auth, message, phones, send, stats

MSG_FIELDS = "id,providerMessageId,status"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ABSENT = object()


def test_provider_message_id_is_null_until_the_lag_has_passed(make_sim):
    sim = make_sim(stats_lag=0.6)
    ids = [i["id"] for i in send(sim, message(phones(3))).json()]
    assert sim.wait_idle(5)
    items = stats(sim, "messages", fields=MSG_FIELDS, channel="CHAT").json()["items"]
    assert sorted(i["id"] for i in items) == sorted(ids)
    assert all(i["providerMessageId"] is None and i["status"] == "DELIVERED" for i in items)
    assert set(items[0]) == {"id", "providerMessageId", "status"}
    assert stats(sim, "sessions").json()["count"] == 0
    time.sleep(0.7)
    items = stats(sim, "messages", fields=MSG_FIELDS).json()["items"]
    truth = {t["id"]: t["sessionId"] for t in sim.truth()}
    assert all(i["providerMessageId"] == truth[i["id"]] for i in items)
    assert stats(sim, "sessions").json()["count"] == 3


def test_result_fills_in_later_and_matches_truth(make_sim):
    sim = make_sim(result_after=(0.3, 0.4))
    send(sim, message(phones(2)))
    assert sim.wait_idle(5)
    items = stats(sim, "sessions").json()["items"]
    assert [i["dialogResultsFromBotJson"] for i in items] == [{}, {}]
    assert {i["status"] for i in items} == {"ACTIVE"}
    time.sleep(0.45)
    truth = {t["sessionId"]: t for t in sim.truth()}
    for item in stats(sim, "sessions").json()["items"]:
        assert item["dialogResultsFromBotJson"] == truth[item["id"]]["result"]
        assert item["dialogResultsFromBotJson"]["confirmation"] in ("Да", "Нет", "Отказ")
        assert item["status"] == "CLOSED" and item["chatId"] == "chan-1" and item["name"] == "Survey"


def test_paging_over_the_page_cap_covers_every_id_once(make_sim):
    sim = make_sim(page_cap=50, shuffle=True)
    ids = {i["id"] for i in send(sim, message(phones(230))).json()}
    seen = []
    for page in range(10):
        answer = stats(sim, "messages", fields="id", page=page, limit=1000).json()
        assert answer["count"] == 230 and len(answer["items"]) <= 50
        seen += [i["id"] for i in answer["items"]]
    assert len(seen) == 230 and set(seen) == ids
    # the recipe's `pages` spelling is an alias
    assert stats(sim, "messages", fields="id", pages=1, limit=50).json()["items"][0]["id"] == seen[50]


def test_default_order_is_by_creation_time(sim):
    ids = [i["id"] for i in send(sim, message(phones(5))).json()]
    time.sleep(0.01)
    ids += [i["id"] for i in send(sim, message(phones(5))).json()]
    items = stats(sim, "messages", fields="id,createdAt").json()["items"]
    assert [i["createdAt"] for i in items] == sorted(i["createdAt"] for i in items)
    assert set(i["id"] for i in items[5:]) == set(ids[5:])


def test_window_filters_on_creation_and_accepts_space_for_plus(sim):
    send(sim, message(phones(2)))
    # '+' unencoded in a query string arrives as a space
    url = (sim.analyse_url + "/statistics/messaging/messages?from=2000-01-01T00:00:00+00:00"
           "&to=2100-01-01T00:00:00+00:00")
    assert requests.get(url, headers=auth(sim), timeout=5).json()["count"] == 2
    future = stats(sim, "messages", **{"from": "2099-01-01T00:00:00+03:00"}).json()
    assert future == {"count": 0, "items": []}
    assert stats(sim, "messages", channel="SMS").json()["count"] == 0


def test_bad_windows_are_rejected(sim):
    for params in ({"from": "yesterday"}, {"to": ""}, {"from": "2020-01-01T00:00:00"},
                   {"from": "2030-01-01T00:00:00+00:00", "to": "2020-01-01T00:00:00+00:00"}):
        answer = stats(sim, "sessions", **params)
        assert answer.status_code == 422 and "error" in answer.json()
    assert stats(sim, "messages", limit=0).status_code == 422
    assert stats(sim, "messages", page=-1).status_code == 422


def test_sessions_are_shuffled_padded_and_chat_id_of_a_session_is_ignored(make_sim):
    sim = make_sim(padding_sessions=3, shuffle=True)
    send(sim, message(phones(10)))
    assert sim.wait_idle(5)
    truth = sim.truth()
    ours = {t["sessionId"] for t in truth}
    answer = stats(sim, "sessions").json()
    assert answer["count"] == 40
    items = answer["items"]
    assert ours <= {i["id"] for i in items}
    assert len({i["clientId"] for i in items}) == 40
    ordered = sorted(items, key=lambda i: (i["startedAt"], i["id"]))
    assert items != ordered
    # chatId=<session id> (the recipe's filter) is not a channel: ignored, so it matches everything
    filtered = stats(sim, "sessions", chatId=truth[0]["sessionId"]).json()
    assert filtered["count"] == 40
    # chatId=<channel id> does filter, but other chats on that channel still come back
    by_channel = stats(sim, "sessions", chatId="chan-1").json()["items"]
    assert 10 < len(by_channel) < 40 and {i["chatId"] for i in by_channel} == {"chan-1"}


def test_without_count_and_without_items_and_fields(sim):
    send(sim, message(phones(2)))
    assert sim.wait_idle(5)
    assert stats(sim, "sessions", withoutCount="true").json().keys() == {"items"}
    assert stats(sim, "sessions", withoutItems="true").json() == {"count": 2}
    item = stats(sim, "sessions", fields="id,name,clientId,messengerType,nps").json()["items"][0]
    assert set(item) == {"id", "name", "clientId", "messengerType", "dialogResultsFromBotJson"}
    assert item["messengerType"] == "WHATSAPP"


@pytest.mark.parametrize("form, shown", [("{}", {}), ("[]", []), ("null", None), ("missing", ABSENT)])
def test_an_empty_result_is_written_as_configured(make_sim, form, shown):
    sim = make_sim(no_reply_rate=1.0, empty_result=form, session_close_after=0.2)
    send(sim, message(phones(1)))
    assert sim.wait_idle(5)
    time.sleep(0.25)
    for fields in (None, "id,status,dialogResultsFromBotJson"):
        item = stats(sim, "sessions", **({"fields": fields} if fields else {})).json()["items"][0]
        assert item.get("dialogResultsFromBotJson", ABSENT) == shown and item["status"] == "CLOSED"
    assert sim.truth()[0]["result"] is None


def test_empty_result_null_is_still_understood(make_sim):
    sim = make_sim(no_reply_rate=1.0, empty_result_null=True)
    assert sim.config.empty_result == "null"
    send(sim, message(phones(1)))
    assert sim.wait_idle(5)
    assert stats(sim, "sessions").json()["items"][0]["dialogResultsFromBotJson"] is None


def test_an_unknown_empty_result_form_is_refused_naming_the_key(sim):
    answer = requests.post(sim.url + "/_sim/config", json={"empty_result": "none"}, timeout=5)
    assert answer.status_code == 422 and "empty_result" in answer.json()["error"]
    assert sim.config.empty_result == "{}"


def test_results_are_written_like_the_recipes_example(make_sim):
    sim = make_sim()
    bare = message(phones(3))
    for destination in bare["destinations"]:
        del destination["variables"]
    send(sim, message(phones(3, start=10)), bare)
    assert sim.wait_idle(5)
    time.sleep(0.15)
    recipe = json.loads((EXAMPLES / "sessions-statistics-answer.json").read_text())["items"][0]
    items = stats(sim, "sessions").json()["items"]
    assert len(items) == 6
    for item in items:
        result = item["dialogResultsFromBotJson"]
        assert list(result) == list(recipe["dialogResultsFromBotJson"])      # nps, confirmation, initialVariables
        assert isinstance(result["nps"], str) and 1 <= int(result["nps"]) <= 10
        assert result["confirmation"] in ("Да", "Нет", "Отказ")
    variables = sorted(json.dumps(i["dialogResultsFromBotJson"]["initialVariables"]) for i in items)
    assert variables == ["[]", "[]", "[]", '{"n": "0"}', '{"n": "1"}', '{"n": "2"}']


def test_results_are_the_same_for_the_same_seed(make_sim):
    seen = []
    for _ in range(2):
        sim = make_sim(seed=5, undelivered_rate=0.2, expired_rate=0.2, no_reply_rate=0.2)
        send(sim, message(phones(30)))
        assert sim.wait_idle(5)
        seen.append([(t["finalStatus"], t["sessionId"], t["result"]) for t in sim.truth()])
    assert seen[0] == seen[1]
    assert {status for status, _, _ in seen[0]} == {"DELIVERED", "UNDELIVERED", "EXPIRED"}


def test_calls_are_counted_per_endpoint_and_status(sim):
    send(sim, message(phones(1)))
    stats(sim, "messages")
    stats(sim, "sessions", limit="x")
    assert sim.calls() == {"send": {"200": 1}, "messages_stats": {"200": 1}, "sessions_stats": {"422": 1}}
    assert requests.get(sim.url + "/_sim/calls", timeout=5).json() == sim.calls()
    assert Counter(t["status"] for t in requests.get(sim.url + "/_sim/truth", timeout=5).json())


def _epoch(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp()


def test_the_truth_records_when_each_fact_became_visible(make_sim):
    sim = make_sim(stats_lag=0.5, result_after=(0.8, 0.9))
    send(sim, message(phones(2)))
    assert sim.wait_idle(5)
    sim.configure(stats_lag=30.0)       # later changes do not move what was already recorded

    first_seen: dict[str, float] = {}
    results_seen: dict[str, float] = {}
    deadline = time.time() + 5
    while time.time() < deadline and len(results_seen) < 2:
        messages = stats(sim, "messages", fields=MSG_FIELDS).json()["items"]
        sessions = stats(sim, "sessions").json()["items"]
        answered = time.time()      # each fact was shown by now
        for item in messages:
            if item["providerMessageId"]:
                first_seen.setdefault(item["id"], answered)
        for item in sessions:
            if item["dialogResultsFromBotJson"]:
                results_seen.setdefault(item["id"], answered)
        time.sleep(0.02)

    for truth in sim.truth():
        delivered, chat_id_at = _epoch(truth["deliveredAt"]), _epoch(truth["chatIdVisibleAt"])
        assert chat_id_at == pytest.approx(delivered + 0.5, abs=0.002)
        assert chat_id_at <= first_seen[truth["id"]], "never shown before the recorded moment"
        assert _epoch(truth["resultVisibleAt"]) == pytest.approx(_epoch(truth["answeredAt"]), abs=0.002)
        assert _epoch(truth["resultVisibleAt"]) <= results_seen[truth["sessionId"]]


def test_every_call_is_logged_with_its_arrival(make_sim):
    from receiver.simulator import most_calls_within

    sim = make_sim(rate_limit=2)
    before = time.time()
    send(sim, message(phones(1)))
    answers = [stats(sim, "messages").status_code for _ in range(3)]

    log = requests.get(f"{sim.url}/_sim/call-log", timeout=5).json()
    assert [(c["endpoint"], c["outcome"]) for c in log] == \
        [("send", "200")] + [("messages_stats", str(code)) for code in answers]
    assert "429" in map(str, answers), "a refused call is a call too"
    times = sim.call_times(("messages_stats",))
    assert len(times) == 3 and before <= times[0] <= times[-1] <= time.time()
    assert most_calls_within(times, 60.0) == 3
    assert most_calls_within([0.0, 30.0, 59.9, 60.0, 90.0], 60.0) == 3
