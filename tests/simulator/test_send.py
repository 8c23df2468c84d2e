import copy

import pytest
import requests

from .helpers import auth, message, phones, send

GOOD = {"messages": [message(["79991234567"])]}


def broken(mutate):
    body = copy.deepcopy(GOOD)
    mutate(body)
    return body


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.pop("messages"), "messages"),
    (lambda b: b.update(messages=[]), "messages"),
    (lambda b: b["messages"][0].pop("channels"), "messages[0].channels.chat"),
    (lambda b: b["messages"][0]["channels"]["chat"].pop("chatId"), "messages[0].channels.chat.chatId"),
    (lambda b: b["messages"][0]["channels"]["chat"].pop("botId"), "messages[0].channels.chat.botId"),
    (lambda b: b["messages"][0]["channels"]["chat"].pop("messengerType"),
     "messages[0].channels.chat.messengerType"),
    (lambda b: b["messages"][0]["channels"]["chat"].pop("text"), "messages[0].channels.chat.text"),
    (lambda b: b["messages"][0].pop("destinations"), "messages[0].destinations"),
    (lambda b: b["messages"][0].update(destinations=[]), "messages[0].destinations"),
    (lambda b: b["messages"][0]["destinations"][0].pop("phone"), "messages[0].destinations[0].phone"),
    (lambda b: b["messages"][0]["destinations"][0].update(phone="12ab"), "messages[0].destinations[0].phone"),
    (lambda b: b["messages"].append(message(["79990000000", "123"])), "messages[1].destinations[1].phone"),
])
def test_invalid_send_is_422_naming_the_field(sim, mutate, field):
    answer = requests.post(sim.notify_url + "/messages", json=broken(mutate), headers=auth(sim), timeout=5)
    assert answer.status_code == 422
    assert field in answer.json()["details"]
    assert answer.json()["error"].startswith("Validation failed")
    assert sim.truth() == []


def test_non_json_is_400_and_unauthenticated_is_401(sim):
    answer = requests.post(sim.notify_url + "/messages", data="nope", headers=auth(sim), timeout=5)
    assert answer.status_code == 400 and "error" in answer.json()
    assert requests.post(sim.notify_url + "/messages", json=GOOD, timeout=5).status_code == 401
    assert sim.truth() == []


def test_answer_follows_destination_order(sim):
    first, second = phones(180), phones(120, start=500)
    answer = send(sim, message(first, callback_data="a"), message(second, callback_data="b"))
    assert answer.status_code == 200
    items = answer.json()
    assert len(items) == 300
    assert all(i["status"] == "CREATED" and i["channel"] == "CHAT" and i["error"] is None for i in items)
    assert len({i["id"] for i in items}) == 300
    assert len({i["bulkId"] for i in items}) == 1
    assert len({i["groupId"] for i in items}) == 2
    by_id = {t["id"]: t for t in sim.truth()}
    assert [by_id[i["id"]]["phone"] for i in items] == first + second
    assert [by_id[i["id"]]["destinationIndex"] for i in items] == list(range(180)) + list(range(120))


def test_fail_sends_takes_nothing_then_the_retry_works(make_sim):
    sim = make_sim(fail_sends=[0])
    assert send(sim, message(phones(3))).status_code == 503
    assert sim.truth() == []
    assert send(sim, message(phones(3))).status_code == 200
    assert len(sim.truth()) == 3
    assert sim.calls()["send"] == {"503": 1, "200": 1}


def test_drop_after_accept_creates_the_messages_but_no_answer(make_sim, receiver):
    sim = make_sim(drop_after_accept_sends=[0], drop_sleep=0)
    with pytest.raises(requests.ConnectionError):
        send(sim, message(phones(2), callback_url=receiver.url))
    assert len(sim.truth()) == 2
    assert sim.wait_idle(5)
    assert len(receiver.bodies) == 4


def test_drop_after_accept_by_stalling(make_sim):
    sim = make_sim(drop_after_accept_sends=[0], drop_sleep=1.0)
    with pytest.raises(requests.Timeout):
        send(sim, message(phones(1)), timeout=0.3)
    assert len(sim.truth()) == 1


def test_error_rate_one_gives_5xx_and_takes_nothing(make_sim):
    sim = make_sim(error_rate=1.0)
    for _ in range(5):
        assert send(sim, message(phones(1))).status_code in (500, 502, 503)
    assert sim.truth() == []
