"""POST /api/sends and GET /api/sends/{id} (receiver/sending_api.py) against the simulator; the worker's
pass that sends what they record is `worker_pass` (tests/support.py)."""
from __future__ import annotations

import datetime as dt
import json

from receiver.models import Message, Send

from .support import CHAT_JSON, QUIET, REFUSAL, api_body, send_requests, sends_per_phone, worker_pass

SIM_DEFAULTS = QUIET        # no callbacks while a test runs, unless it asks for them


def test_api_records_at_once_and_the_worker_sends(sim, sim_app, api_headers, send_headers):
    client = sim_app.test_client()
    body = api_body(5)
    assert client.post("/api/sends", json=body).status_code == 401

    bad = client.post("/api/sends", headers=send_headers, json={
        "chat": {"chatId": "c"}, "destinations": [{"phone": "79990000001"}, {"phone": "12"}], "extra": 1})
    assert bad.status_code == 422
    problems = {(p["where"], p["field"]) for p in bad.get_json()["problems"]}
    assert {("body", "extra"), ("chat", "botId"), ("chat", "text"), ("item 2", "phone")} <= problems
    assert send_requests(sim) == 0 and Send.select().count() == 0

    # Answered before anything goes to TWIN: the request only records the rows.
    accepted = client.post("/api/sends", headers=send_headers, json=body)
    assert accepted.status_code == 202, accepted.get_json()
    answer = accepted.get_json()
    url = f"/api/sends/{answer['send']['id']}"
    assert answer["url"] == url and accepted.headers["Location"] == url
    assert answer["status"] == "queued" and answer["counts"]["pending"] == 5 and not answer["complete"]
    assert send_requests(sim) == 0
    assert client.get(url).status_code == 401
    assert client.get(url, headers=api_headers).get_json()["status"] == "queued"
    assert client.get("/api/sends/999", headers=api_headers).status_code == 404

    assert worker_pass(sim_app) == 5
    done = client.get(url, headers=api_headers)
    assert done.status_code == 200
    report = done.get_json()
    assert report["status"] == "done" and report["complete"] and report["counts"]["sent"] == 5
    truth = {t["phone"]: t["id"] for t in sim.truth()}
    assert [(r["index"], r["phone"], r["state"], r["messageId"]) for r in report["rows"]] == \
        [(i, f"7999000000{i}", "sent", truth[f"7999000000{i}"]) for i in range(5)]
    assert worker_pass(sim_app) == 0

    # The same request again: nothing is left to send, and nothing goes out.
    again = client.post("/api/sends", headers=send_headers, json=body)
    assert again.status_code == 202 and again.get_json()["status"] == "done"
    assert again.get_json()["counts"]["sent"] == 5
    assert worker_pass(sim_app) == 0 and send_requests(sim) == 1


def test_api_a_failed_batch_stops_until_asked_again(make_sim, make_sim_app, api_headers, send_headers):
    sim = make_sim(fail_sends=[0])                   # a 503: TWIN may have taken it
    app = make_sim_app(sim)
    client = app.test_client()
    body = api_body(3, batchSize=2)
    url = client.post("/api/sends", headers=send_headers, json=body).get_json()["url"]
    assert worker_pass(app) == 3
    report = client.get(url, headers=api_headers).get_json()
    assert [r["state"] for r in report["rows"]] == ["unknown", "unknown", "pending"]
    assert report["status"] == "done" and report["failureKind"] == "unknown"
    assert "outcome unknown, TWIN may have taken it" in report["failure"]
    assert worker_pass(app) == 0 and send_requests(sim) == 1     # stopped: not ploughing on

    # Asked again: the pending row goes out, the unknown ones are not resent...
    assert client.post("/api/sends", headers=send_headers, json=body).status_code == 202
    assert worker_pass(app) == 1
    report = client.get(url, headers=api_headers).get_json()
    assert [r["state"] for r in report["rows"]] == ["unknown", "unknown", "sent"]
    assert report["failure"] is None and send_requests(sim) == 2
    # ...unless asked to (here the 503 had taken nothing: no phone gets two messages).
    assert client.post("/api/sends", headers=send_headers, json={**body, "resendUnknown": True}).status_code == 202
    assert worker_pass(app) == 2
    assert client.get(url, headers=api_headers).get_json()["complete"]
    counts = sends_per_phone(sim)
    assert len(counts) == 3 and set(counts.values()) == {1}


def test_api_takes_large_lists_and_dry_runs_them(sim, sim_app, send_headers):
    body = {"chat": CHAT_JSON, "dryRun": True,
            "destinations": [{"phone": str(79990000000 + i), "variables": {"name": "x" * 20}}
                             for i in range(3000)]}
    assert len(json.dumps(body)) > sim_app.config["MAX_CONTENT_LENGTH"]
    response = sim_app.test_client().post("/api/sends", headers=send_headers, json=body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["counts"]["pending"] == 3000
    assert send_requests(sim) == 0 and Send.select().count() == 0


def test_api_refused_destination_options_and_destinations_without_a_phone(make_sim, make_sim_app, api_headers,
                                                                          send_headers):
    sim = make_sim(refuse_phones=["79990000001"])
    app = make_sim_app(sim)
    client = app.test_client()
    send_at = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(microsecond=0).isoformat()
    body = {"chat": {**CHAT_JSON, "validityPeriod": 60}, "callbackData": "api-r", "sendAt": send_at,
            "allowedTimeRanges": [["09:00:00", "18:00:00"]],
            "destinations": [{"phone": "79990000000", "externalId": "e0"}, {"phone": "79990000001", "externalId": "e1"},
                             {"messengerUserId": "wa-2", "externalId": "e2", "variables": {"name": "B"}}]}
    accepted = client.post("/api/sends", headers=send_headers, json=body)
    assert accepted.status_code == 202, accepted.get_json()
    url = accepted.get_json()["url"]
    assert worker_pass(app) == 3
    report = client.get(url, headers=api_headers).get_json()
    assert [(r["phone"], r["messengerUserId"], r["externalId"], r["state"]) for r in report["rows"]] == [
        ("79990000000", None, "e0", "sent"), ("79990000001", None, "e1", "refused"), (None, "wa-2", "e2", "sent")]
    assert report["rows"][1]["error"] == REFUSAL and report["rows"][1]["messageId"] is None
    assert report["counts"]["refused"] == 1 and report["counts"]["sent"] == 2 and report["failure"] is None
    # What TWIN got: the options where they belong, and the destination without a phone as given.
    received = sim.world.messages
    assert received[0].options == {"sendAt": send_at, "allowedTimeRanges": [["09:00:00", "18:00:00"]]}
    assert received[0].chat["validityPeriod"] == 60
    assert received[1].destination == {"messengerUserId": "wa-2", "externalId": "e2", "variables": {"name": "B"}}
    stored = Message.get_by_id(report["rows"][2]["messageId"])
    assert (stored.phone, stored.messenger_user_id, stored.destination_index) == (None, "wa-2", 2)

    # The same request again, even with resendUnknown: the refused destination stays refused.
    again = client.post("/api/sends", headers=send_headers, json={**body, "resendUnknown": True})
    assert again.status_code == 202 and again.get_json()["counts"]["refused"] == 1
    assert worker_pass(app) == 0 and send_requests(sim) == 1


def test_a_nul_character_is_refused_by_name_on_every_database(sim, sim_app, send_headers):
    response = sim_app.test_client().post("/api/sends", headers=send_headers, json={
        **api_body(2), "callbackData": "a\x00b",
        "destinations": [{"messengerUserId": "u\x001"}, {"phone": "+79990000001", "externalId": "e\x00"}]})
    assert response.status_code == 422
    problems = {(p["where"], p["field"], p["message"]) for p in response.get_json()["problems"]}
    assert problems == {("chat", "callbackData", "contains a NUL character"),
                        ("item 1", "messengerUserId", "contains a NUL character"),
                        ("item 2", "externalId", "contains a NUL character")}
    assert send_requests(sim) == 0 and Send.select().count() == 0
