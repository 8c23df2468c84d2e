import copy
import json
from pathlib import Path

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
    (lambda b: b["messages"][0]["destinations"][0].update(phone=None, messengerUserId=""),
     "messages[0].destinations[0].messengerUserId"),
    (lambda b: b["messages"][0]["destinations"][0].update(externalId=7), "messages[0].destinations[0].externalId"),
    (lambda b: b["messages"][0]["channels"]["chat"].update(validityPeriod=0),
     "messages[0].channels.chat.validityPeriod"),
    (lambda b: b["messages"][0]["channels"]["chat"].update(validityPeriod=2881),
     "messages[0].channels.chat.validityPeriod"),
    (lambda b: b["messages"][0]["channels"]["chat"].update(continueLastOrStartNewSession="yes"),
     "messages[0].channels.chat.continueLastOrStartNewSession"),
    (lambda b: b["messages"][0].update(sendAt="next week"), "messages[0].sendAt"),
    (lambda b: b["messages"][0].update(allowedTimeRanges=[["9:00", "18:00:00"]]), "messages[0].allowedTimeRanges"),
    (lambda b: b["messages"][0].update(allowedTimeRanges=["09:00:00-18:00:00"]), "messages[0].allowedTimeRanges"),
    (lambda b: b["messages"][0].update(templateId=12), "messages[0].templateId"),
    (lambda b: b["messages"][0].update(callbackData="x" * 10241), "messages[0].callbackData"),
    (lambda b: b["messages"][0].update(callbackUrl="https://r.example/" + "a" * 3983), "messages[0].callbackUrl"),
])
def test_invalid_send_is_422_naming_the_field(sim, mutate, field):
    answer = requests.post(sim.notify_url + "/messages", json=broken(mutate), headers=auth(sim), timeout=5)
    assert answer.status_code == 422
    assert field in answer.json()["details"]
    assert answer.json()["error"].startswith("Validation failed")
    assert sim.truth() == []


def test_options_and_destinations_without_a_phone_are_taken(sim):
    body = message(["79991234567"], sendAt="2099-03-01T10:00:00+03:00", templateId="tpl", useShortLinks=True,
                   allowedTimeRanges=[["09:00:00", "18:00:00"]])
    body["channels"]["chat"].update(validityPeriod=2880, continueLastOrStartNewSession=False)
    body["destinations"].append({"messengerUserId": "wa-1", "externalId": "crm-1"})
    assert send(sim, body).status_code == 200
    first, second = sim.world.messages
    assert first.options == {"sendAt": "2099-03-01T10:00:00+03:00", "templateId": "tpl", "useShortLinks": True,
                             "allowedTimeRanges": [["09:00:00", "18:00:00"]]}
    assert first.chat["validityPeriod"] == 2880 and first.chat["continueLastOrStartNewSession"] is False
    assert (second.phone, second.destination) == (None, {"messengerUserId": "wa-1", "externalId": "crm-1"})


REFUSED_EXAMPLE = json.loads(Path("tests/examples/send-answer-with-refused-destination.json").read_text())[0]


def test_a_refused_destination_is_answered_like_twin_and_gets_no_message(make_sim, receiver):
    sim = make_sim(refuse_phones=["79990000001", "wa-9"], pending_after=(0.01, 0.02), final_after=(0.01, 0.02))
    body = message(phones(3), callback_url=receiver.url, callback_data="r")
    body["destinations"].append({"messengerUserId": "wa-9"})
    items = send(sim, body).json()
    assert [item["id"] is None for item in items] == [False, True, False, True]
    for refused in (items[1], items[3]):
        assert set(refused) == set(REFUSED_EXAMPLE) and set(refused["error"]) == set(REFUSED_EXAMPLE["error"])
        assert refused["status"] is None and refused["flowId"] is None and refused["channel"] == "CHAT"
        assert isinstance(refused["error"]["message"], str) and isinstance(refused["error"]["line"], int)
    assert "79990000001" in items[1]["error"]["message"]
    truth = sim.truth()
    assert [(t["phone"], t["id"]) for t in truth] == [("79990000000", items[0]["id"]), ("79990000002", items[2]["id"])]
    assert sim.wait_idle(5)
    assert {b["id"] for b in receiver.bodies} == {items[0]["id"], items[2]["id"]}   # no callback for a refusal


def test_refuse_rate_refuses_a_share_the_same_way_each_time(make_sim):
    def refused_positions(sim) -> list[int]:
        return [n for n, item in enumerate(send(sim, message(phones(60))).json()) if item["id"] is None]

    first, second = make_sim(refuse_rate=0.3, seed=4), make_sim(refuse_rate=0.3, seed=4)
    positions = refused_positions(first)
    assert 5 < len(positions) < 35 and refused_positions(second) == positions
    assert len(first.truth()) == 60 - len(positions)


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
