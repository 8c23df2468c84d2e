"""Input the API cannot use is a 4xx with a reason, never a 500: JSON nested too deeply, ids past 64
bits, NUL characters, unknown parameters. And JSON numbers are read as JSON reads them (60.0 is 60)."""
from __future__ import annotations

import dataclasses

import pytest

from receiver.models import Rejected

from .support import CALLBACK_PATH, SEND_TOKEN, seed

SEND_AUTH = {"Authorization": f"Bearer {SEND_TOKEN}"}
SEND = {"chat": {"chatId": "chat-1", "botId": "bot-1", "text": "Hello"},
        "destinations": [{"phone": "79990000001"}, {"phone": "79990000002"}]}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("body", [
    '{"chat": ' + nested(100_000) + "}",                       # json.loads itself would recurse too deep
    '{"chat": {"chatId": "c", "botId": "b", "text": "t", "allowedTimeRanges": [' + nested(975) + "]},"
    ' "destinations": [{"phone": "79990000001"}], "dryRun": true}',     # parses, then breaks the checks
])
def test_a_send_nested_too_deeply_is_a_400_with_its_reason(sends_client, body):
    answer = sends_client.post("/api/sends", data=body, content_type="application/json", headers=SEND_AUTH)
    assert answer.status_code == 400
    assert answer.get_json() == {"error": "invalid_json",
                                 "detail": "the body is not usable JSON: nested more than 32 levels deep"}


def test_a_send_that_is_not_json_is_refused_with_its_reason(sends_client):
    broken = sends_client.post("/api/sends", data='{"chat": ', content_type="application/json", headers=SEND_AUTH)
    assert broken.status_code == 400 and broken.get_json()["error"] == "invalid_json"
    infinite = sends_client.post("/api/sends", data='{"chat": {}, "batchSize": 1e400}',
                                 content_type="application/json", headers=SEND_AUTH)
    assert infinite.status_code == 400 and "1e400 is out of range" in infinite.get_json()["detail"]
    form = sends_client.post("/api/sends", data={"chat": "x"}, headers=SEND_AUTH)
    assert form.status_code == 415 and form.get_json()["error"] == "unsupported_media_type"


def test_json_numbers_are_read_as_json_reads_them(sends_client):
    body = {**SEND, "validityPeriod": 60.0, "batchSize": 1.0,
            "destinations": [{"phone": 79990000001.0, "variables": {"n": 7.5}}]}
    answer = sends_client.post("/api/sends", json=body, headers=SEND_AUTH)
    assert answer.status_code == 202, answer.get_json()
    assert answer.get_json()["rows"][0]["phone"] == "79990000001"


def test_a_callback_nested_too_deeply_is_a_400_and_kept(client):
    body = '{"id": "m-1", "newStatus": "PENDING", "callbackData": ' + nested(975) + "}"
    answer = client.post(CALLBACK_PATH, data=body, content_type="application/json")
    assert answer.status_code == 400
    assert answer.get_json()["detail"] == "the body is nested more than 32 levels deep"
    assert [(r.reason, bytes(r.body)) for r in Rejected.select()] == [("unparsable_json", body.encode())]


@pytest.mark.parametrize("send_id", [2**63, 32190898492606942413848576])
def test_a_send_id_past_64_bits_is_not_found(client, api_headers, send_id):
    answer = client.get(f"/api/sends/{send_id}", headers=api_headers)
    assert answer.status_code == 404
    assert answer.get_json() == {"error": "not_found", "detail": f"there is no send #{send_id}"}


@pytest.mark.parametrize("path", ["/api/messages?id=m%00", "/api/messages?callbackData=a%00b",
                                  "/api/results?status=DELIVERED%00", "/api/results.csv?callbackData=%00",
                                  "/api/results/summary?bulkId=b%00"])
def test_a_nul_character_in_a_parameter_is_a_400(client, api_headers, path):
    answer = client.get(path, headers=api_headers)
    assert answer.status_code == 400
    assert answer.get_json()["detail"] == "contains a NUL character"


def test_messages_take_callback_data_or_id_or_both_and_nothing_else(client, api_headers):
    seed(client, 2, callback_data="mailing-1")
    seed(client, 1, prefix="x", callback_data="mailing-2")

    def ids(query):
        answer = client.get(f"/api/messages?{query}", headers=api_headers)
        assert answer.status_code == 200, answer.get_json()
        return [m["id"] for m in answer.get_json()["messages"]]

    assert ids("callbackData=mailing-1") == ["m00000", "m00001"]
    assert ids("id=x00000") == ["x00000"]
    assert ids("callbackData=mailing-1&id=m00001") == ["m00001"]
    assert ids("callbackData=mailing-1&id=x00000") == []
    unknown = client.get("/api/messages?callbackdata=mailing-1", headers=api_headers)
    assert unknown.status_code == 400
    assert unknown.get_json() == {"error": "bad_parameter", "parameter": "callbackdata",
                                  "detail": "unknown parameter; known: callbackData, id"}


def test_a_wrong_option_in_chat_is_refused_even_when_the_one_beside_it_wins(sends_client):
    body = {**SEND, "chat": {**SEND["chat"], "validityPeriod": 0}, "validityPeriod": 60, "dryRun": True}
    answer = sends_client.post("/api/sends", json=body, headers=SEND_AUTH)
    assert answer.status_code == 422
    assert [(p["where"], p["field"]) for p in answer.get_json()["problems"]] == [("chat", "validityPeriod")]
    body["chat"]["validityPeriod"] = 30
    assert sends_client.post("/api/sends", json=body, headers=SEND_AUTH).status_code == 200


def test_every_problem_of_a_send_is_named_in_the_order_of_the_checks(sends_client):
    app = sends_client.application
    long_url = "https://r.example/" + "a" * 4000          # its callbackUrl is over TWIN's limit
    app.config["SETTINGS"] = dataclasses.replace(app.config["SETTINGS"], public_url=long_url)
    body = {"zeta": 1, "alpha": 2, "batchSize": 0, "resendUnknown": "yes", "dryRun": 1,
            "chat": {"chatId": "c", "validityPeriod": 0}, "validityPeriod": 60, "callbackData": 5,
            "destinations": [{"phone": "79990000001"}, {"phone": "12"}]}
    answer = sends_client.post("/api/sends", json=body, headers=SEND_AUTH)
    assert answer.status_code == 422
    assert answer.get_json()["error"] == "invalid_input"
    assert [(p["where"], p["field"]) for p in answer.get_json()["problems"]] == [
        ("body", "alpha"), ("body", "zeta"), ("body", "batchSize"), ("body", "resendUnknown"), ("body", "dryRun"),
        ("chat", "botId"), ("chat", "text"), ("chat", "callbackData"), ("chat", "validityPeriod"),
        ("item 2", "phone"), ("settings", "callbackUrl")]

    body = {"zeta": 1, "chat": "c", "batchSize": "2", "destinations": []}
    answer = sends_client.post("/api/sends", json=body, headers=SEND_AUTH)
    assert [(p["where"], p["field"], p["message"]) for p in answer.get_json()["problems"]][:-1] == [
        ("body", "zeta", "is not a known field"), ("body", "chat", "must be an object of chat settings"),
        ("body", "batchSize", "must be a whole number of at least 1"),
        ("chat", "chatId", "is missing (give --chat-id or put chatId in --config)"),
        ("chat", "botId", "is missing (give --bot-id or put botId in --config)"),
        ("chat", "text", "is missing (give --text or put text in --config)"),
        ("body", "destinations", "has no destinations")]
