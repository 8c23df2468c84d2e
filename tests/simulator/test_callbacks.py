import json
import threading
import time
from collections import Counter, defaultdict

from .helpers import Receiver, free_port, message, phones, send, stats

FIELDS = {"id", "bulkId", "groupId", "flowId", "oldStatus", "newStatus", "oldStatusCode", "newStatusCode",
          "price", "partCount", "callbackData"}


def by_message(bodies):
    grouped = defaultdict(list)
    for body in bodies:
        grouped[body["id"]].append(body)
    return grouped


def test_callbacks_carry_twins_fields_codes_and_callback_data_verbatim(sim, receiver):
    data = 'Заказ "id":"23233" \\ ünï'
    ids = [i["id"] for i in send(sim, message(phones(5), callback_url=receiver.url, callback_data=data)).json()]
    assert sim.wait_idle(5)
    grouped = by_message(receiver.bodies)
    assert set(grouped) == set(ids)
    for bodies in grouped.values():
        assert [b["newStatus"] for b in bodies] == ["PENDING", "DELIVERED"]
        assert [b["oldStatus"] for b in bodies] == ["CREATED", "PENDING"]
        assert [b["newStatusCode"] for b in bodies] == [2, 6]
        for body in bodies:
            assert set(body) == FIELDS
            assert body["callbackData"] == data
            assert isinstance(body["price"], (int, float)) and isinstance(body["partCount"], int)
    assert "Заказ".encode() in receiver.raw[0]      # raw UTF-8, not \u escapes


def test_callback_data_absent_when_not_given(sim, receiver):
    send(sim, message(phones(1), callback_url=receiver.url))
    assert sim.wait_idle(5)
    assert all("callbackData" not in b for b in receiver.bodies) and len(receiver.bodies) == 2


def test_failed_deliveries_end_undelivered_or_error(make_sim, receiver):
    sim = make_sim(undelivered_rate=0.5, error_rate_status=0.5)
    send(sim, message(phones(20), callback_url=receiver.url))
    assert sim.wait_idle(5)
    finals = Counter(b["newStatus"] for b in receiver.bodies if b["oldStatus"] == "PENDING")
    assert set(finals) == {"UNDELIVERED", "ERROR"} and sum(finals.values()) == 20
    assert all(t["sessionId"] is None and t["result"] is None for t in sim.truth())


def test_expired_is_final_without_a_session_and_is_called_back(make_sim, receiver):
    sim = make_sim(expired_rate=1.0)
    ids = [i["id"] for i in send(sim, message(phones(4), callback_url=receiver.url, callback_data="e")).json()]
    assert sim.wait_idle(5)
    for bodies in by_message(receiver.bodies).values():
        assert [(b["oldStatus"], b["newStatus"]) for b in bodies] == [("CREATED", "PENDING"), ("PENDING", "EXPIRED")]
        assert bodies[-1]["oldStatusCode"] == 2 and isinstance(bodies[-1]["newStatusCode"], int)
        assert bodies[-1]["price"] == 0 and bodies[-1]["callbackData"] == "e"
    assert set(by_message(receiver.bodies)) == set(ids)
    truth = sim.truth()
    assert {(t["status"], t["finished"], t["sessionId"], t["result"]) for t in truth} == {("EXPIRED", True, None, None)}
    assert stats(sim, "sessions").json()["count"] == 0
    items = stats(sim, "messages", fields="id,providerMessageId,status").json()["items"]
    assert {(i["status"], i["providerMessageId"]) for i in items} == {("EXPIRED", None)}


def test_failure_shares_split_the_messages(make_sim):
    sim = make_sim(undelivered_rate=0.25, error_rate_status=0.25, expired_rate=0.25)
    send(sim, message(phones(200)))
    assert sim.wait_idle(5)
    finals = Counter(t["finalStatus"] for t in sim.truth())
    assert set(finals) == {"UNDELIVERED", "ERROR", "EXPIRED", "DELIVERED"}
    assert all(25 <= count <= 75 for count in finals.values()), finals


def test_truth_matches_callbacks(make_sim, receiver):
    sim = make_sim(undelivered_rate=0.3, no_reply_rate=0.3)
    send(sim, message(phones(30), callback_url=receiver.url, callback_data="x"))
    assert sim.wait_idle(5)
    last = {mid: bodies[-1] for mid, bodies in by_message(receiver.bodies).items()}
    truth = sim.truth()
    assert len(truth) == 30
    for item in truth:
        assert item["finished"] and last[item["id"]]["newStatus"] == item["status"] == item["finalStatus"]
        assert [h["status"] for h in item["history"]] == ["CREATED", "PENDING", item["status"]]
        assert (item["sessionId"] is not None) == (item["status"] == "DELIVERED")
    assert any(t["status"] == "DELIVERED" and t["result"] is None for t in truth)     # no reply
    assert any(t["result"] and t["result"]["initialVariables"] for t in truth)


def test_duplicates_quirk_posts_callbacks_twice(make_sim, receiver):
    sim = make_sim(duplicate_callbacks=1.0)
    send(sim, message(phones(5), callback_url=receiver.url))
    assert sim.wait_idle(5)
    counts = Counter((b["id"], b["newStatus"]) for b in receiver.bodies)
    assert len(counts) == 10 and set(counts.values()) == {2}


def test_reorder_quirk_delivers_final_before_pending(make_sim, receiver):
    sim = make_sim(reorder_callbacks=1.0)
    send(sim, message(phones(5), callback_url=receiver.url))
    assert sim.wait_idle(5)
    for bodies in by_message(receiver.bodies).values():
        assert [b["newStatus"] for b in bodies] == ["DELIVERED", "PENDING"]


def test_quirks_are_repeatable_with_the_same_seed(make_sim):
    outcomes = []
    for _ in range(2):
        receiver = Receiver().start()
        sim = make_sim(seed=7, duplicate_callbacks=0.5, undelivered_rate=0.3)
        ids = [i["id"] for i in send(sim, message(phones(20), callback_url=receiver.url)).json()]
        assert sim.wait_idle(5)
        counts = Counter((ids.index(b["id"]), b["newStatus"]) for b in receiver.bodies)
        outcomes.append((ids, sorted(counts.items())))
        receiver.stop()
    assert outcomes[0] == outcomes[1]


def test_retries_while_the_receiver_answers_503(sim, receiver):
    receiver.status = 503
    send(sim, message(phones(2), callback_url=receiver.url))
    time.sleep(0.25)
    assert receiver.bodies == []
    receiver.status = 200
    assert sim.wait_idle(5)
    assert len(receiver.bodies) == 4
    calls = sim.calls()["callback"]
    assert calls["503"] >= 1 and calls["retry"] >= 1 and calls["200"] == 4 and "gave_up" not in calls


def test_retries_while_the_receiver_is_down_then_up(sim):
    port = free_port()
    url = f"http://127.0.0.1:{port}/cb"
    send(sim, message(phones(2), callback_url=url))
    time.sleep(0.3)
    receiver = Receiver(port).start()
    try:
        assert sim.wait_idle(5)
        assert len(receiver.bodies) == 4
        assert sim.calls()["callback"]["connection_error"] >= 1
    finally:
        receiver.stop()


def test_gives_up_after_the_retries_and_does_not_retry_4xx(make_sim, receiver):
    sim = make_sim(callback_retries=2, callback_retry_delay=0.01)
    receiver.status = 500
    send(sim, message(phones(1), callback_url=receiver.url))
    assert sim.wait_idle(5)
    calls = sim.calls()["callback"]
    assert calls["500"] == 6 and calls["retry"] == 4 and calls["gave_up"] == 2
    receiver.status = 404
    send(sim, message(phones(1), callback_url=receiver.url))
    assert sim.wait_idle(5)
    assert sim.calls()["callback"]["404"] == 2 and sim.calls()["callback"]["rejected"] == 2


def test_many_messages_use_few_threads(make_sim, receiver):
    sim = make_sim(pending_after=(0.0, 0.1), final_after=(0.0, 0.1))
    before = threading.active_count()
    send(sim, message(phones(1000), callback_url=receiver.url))
    assert threading.active_count() < before + 20
    assert sim.wait_idle(20)
    assert len(receiver.bodies) == 2000
    assert json.loads(receiver.raw[0])["id"]
