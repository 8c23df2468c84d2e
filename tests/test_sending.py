"""Sending through the receiver (receiver/sending.py, `flask send`, POST /api/sends) against the simulator."""
from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import threading
import time
from collections import Counter

import pytest
from peewee import DatabaseError, SqliteDatabase

from receiver import create_app, destinations, models, sending
from receiver.callbudget import CallBudget
from receiver.models import Message, Outbox, Send
from receiver.twin24 import TwinClient
from receiver.worker import Worker

from .conftest import CALLBACK_TOKEN, SIM_QUICK, make_settings

# Lifecycles far in the future: no callbacks while a test runs, unless it asks for them.
QUIET = dict(pending_after=(60.0, 60.0), final_after=(60.0, 60.0))
CHAT = ["--chat-id", "chan-1", "--bot-id", "bot-1", "--text", "Hello {{name}}",
        "--chat-session-name", "spring", "--callback-data", "campaign-1"]
CHAT_JSON = {"chatId": "chan-1", "botId": "bot-1", "text": "Hello", "chatSessionName": "spring"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def sim_defaults():
    return {"seed": 1, **QUIET}


def sim_settings(database_url, sim, **overrides):
    values = dict(twin24_token=sim.static_token, twin24_auth_url=sim.auth_url,
                  twin24_notify_url=sim.notify_url, twin24_analyse_url=sim.analyse_url,
                  twin24_connect_timeout=0.5, twin24_read_timeout=1.0, twin24_retries=1,
                  twin24_max_retry_wait=0.05, public_url=f"http://127.0.0.1:{closed_port()}")
    values.update(overrides)
    return make_settings(database_url, **values)


@pytest.fixture
def make_sim_app(database_url):
    def make(sim, **overrides):
        app = create_app(sim_settings(database_url, sim, **overrides))
        app.config["TESTING"] = True
        return app
    yield make
    if not models.db.is_closed():
        models.db.close()


@pytest.fixture
def sim_app(make_sim_app, sim):
    return make_sim_app(sim)


def csv_text(count: int, start: int = 79990000000) -> str:
    rows = ["phone,messengerUserId,name,age"]
    rows += [f"+{start + i},{start + i},Name {i},{20 + i % 50}" for i in range(count)]
    return "\n".join(rows) + "\n"


def write(tmp_path, text: str, name: str = "list.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_cli(app, *args):
    # `flask` pushes an app context for every command; the test runner does not.
    with app.app_context():
        return app.test_cli_runner().invoke(args=["send", *args])


def sends_per_phone(sim) -> Counter:
    return Counter(item["phone"] for item in sim.truth())


def send_requests(sim) -> int:
    return sum(sim.calls().get("send", {}).values())


def outbox_states() -> Counter:
    return Counter(state for (state,) in Outbox.select(Outbox.state).tuples())


# ------------------------------------------------------------------------------------ reports
def test_line_ranges():
    assert sending.line_ranges([5, 2, 3, 4, 9, 11, 12]) == "2-5, 9, 11-12"


# ------------------------------------------------------------------------------------ the CLI
def test_bad_input_sends_nothing(sim, sim_app, tmp_path):
    result = run_cli(sim_app, write(tmp_path, "phone,name\n79990000001,a\n12ab,b\n"), *CHAT)
    assert result.exit_code == 2
    assert "line 3, phone: '12ab' is not a phone number" in result.output
    result = run_cli(sim_app, write(tmp_path, csv_text(2), "ok.csv"), "--chat-id", "c", "--text", "t")
    assert result.exit_code == 2 and "botId: is missing" in result.output
    assert send_requests(sim) == 0 and Send.select().count() == 0


def test_a_cli_send_spends_the_call_budget_the_workers_share(make_sim_app, sim, tmp_path):
    app = make_sim_app(sim, twin24_max_calls_per_minute=10)
    result = run_cli(app, write(tmp_path, csv_text(3)), *CHAT)
    assert result.exit_code == 0, result.output
    assert send_requests(sim) == 1
    budget = CallBudget.from_settings(app.config["SETTINGS"])
    assert budget.free() == 9 - 1, "the workers see the send's call in the minute's budget (9 of 10 are theirs)"


def test_order_is_kept_for_many_destinations(sim, sim_app, tmp_path):
    path = write(tmp_path, csv_text(1200))
    result = run_cli(sim_app, path, *CHAT, "--batch-size", "500")
    assert result.exit_code == 0, result.output
    assert "sent now:" in result.output and "1200" in result.output
    assert send_requests(sim) == 3
    truth = {item["phone"]: item for item in sim.truth()}
    assert len(truth) == 1200
    stored = {m.phone: m for m in Message.select()}
    assert {phone: m.id for phone, m in stored.items()} == {phone: t["id"] for phone, t in truth.items()}
    for index in (0, 499, 500, 1199):
        phone = str(79990000000 + index)
        message = stored[phone]
        assert message.destination_index == index
        assert json.loads(message.variables) == {"name": f"Name {index}", "age": str(20 + index % 50)}
        assert message.messenger_user_id == phone and message.callback_data == "campaign-1"
        assert message.bulk_id == truth[phone]["bulkId"] and message.flow_id == truth[phone]["flowId"]
        assert message.send_id == Send.get().id and message.status == "CREATED"
    assert truth["79990000000"]["callbackUrl"] == \
        f"{sim_app.config['SETTINGS'].public_url}/callbacks/{CALLBACK_TOKEN}"
    assert outbox_states() == {"sent": 1200}
    assert sorted({row.batch for row in Outbox.select()}) == [1, 2, 3]
    # The same file again: everything was sent, nothing goes out.
    again = run_cli(sim_app, path, *CHAT, "--batch-size", "500")
    assert again.exit_code == 0 and "sent earlier:" in again.output
    assert send_requests(sim) == 3


def test_a_5xx_mid_list_is_unknown_and_never_resent_blindly(make_sim, make_sim_app, tmp_path):
    sim = make_sim(fail_sends=[1])
    app = make_sim_app(sim)
    path = write(tmp_path, csv_text(25))
    first = run_cli(app, path, *CHAT, "--batch-size", "10")
    assert first.exit_code == 1
    assert "sent now:" in first.output and "(lines 2-11)" in first.output
    assert "unknown outcome:" in first.output and "(lines 12-21)" in first.output
    assert "not sent:" in first.output and "(lines 22-26)" in first.output
    assert "stopped: outcome unknown" in first.output
    assert send_requests(sim) == 2 and outbox_states() == {"sent": 10, "unknown": 10, "pending": 5}

    # A rerun sends what provably did not go out, and reports the unknown rows without sending them.
    second = run_cli(app, path, *CHAT, "--batch-size", "10")
    assert second.exit_code == 1
    assert "unknown outcome:" in second.output and "(lines 12-21)" in second.output
    assert send_requests(sim) == 3 and outbox_states() == {"sent": 15, "unknown": 10}
    third = run_cli(app, path, *CHAT, "--batch-size", "10")
    assert send_requests(sim) == 3 and third.exit_code == 1
    counts = sends_per_phone(sim)
    assert len(counts) == 15 and set(counts.values()) == {1}

    # Only when asked, with a warning, are they sent again (here the 503 had taken nothing).
    fourth = run_cli(app, path, *CHAT, "--batch-size", "10", "--resend-unknown")
    assert fourth.exit_code == 0, fourth.output
    assert "may get the message twice" in fourth.output
    counts = sends_per_phone(sim)
    assert len(counts) == 25 and set(counts.values()) == {1}
    assert Message.select().where(Message.phone.is_null(False)).count() == 25


class FlakyClient:
    """A real client, except that the send numbered `fail_at` goes to a port nothing listens on."""

    def __init__(self, settings, fail_at: int):
        self.real = TwinClient(settings)
        self.dead = TwinClient(sim_like(settings, twin24_notify_url=f"http://127.0.0.1:{closed_port()}"))
        self.dead.backoff_base = 0.001
        self.fail_at, self.count = fail_at, 0

    def reserve_call(self, endpoint):
        pass

    def send(self, payload):
        self.count += 1
        return (self.dead if self.count == self.fail_at else self.real).send(payload)


def sim_like(settings, **changes):
    import dataclasses
    return dataclasses.replace(settings, **changes)


def test_not_taken_mid_list_then_a_rerun_finishes_without_duplicates(sim, sim_app, tmp_path):
    settings = sim_app.config["SETTINGS"]
    chat = destinations.chat_settings({**CHAT_JSON, "callbackData": "c-2"})
    rows = destinations.read_csv(csv_text(30))
    url = "http://127.0.0.1:1/callbacks/x"
    report = sending.Sender(settings, chat, callback_url=url, client=FlakyClient(settings, 2),
                            batch_size=10).run(rows)
    assert not report.complete and report.failure_kind == sending.NOT_TAKEN
    assert "did not reach TWIN" in report.failure
    assert report.counts["sent"] == 10 and report.counts["not_taken"] == 10 and report.counts["pending"] == 10
    assert [r.state for r in report.rows[9:12]] == ["sent", "not_taken", "not_taken"]
    assert send_requests(sim) == 1

    rerun = sending.Sender(settings, chat, callback_url=url, batch_size=10).run(rows)
    assert rerun.complete and rerun.counts["sent"] == 30
    assert sum(not r.earlier for r in rerun.rows) == 20
    counts = sends_per_phone(sim)
    assert len(counts) == 30 and set(counts.values()) == {1}
    truth = {item["phone"]: item["id"] for item in sim.truth()}
    assert {r.phone: r.message_id for r in rerun.rows} == truth


def test_connection_refused_sends_nothing_and_says_so(sim, make_sim_app, tmp_path):
    app = make_sim_app(sim, twin24_notify_url=f"http://127.0.0.1:{closed_port()}")
    path = write(tmp_path, csv_text(5))
    result = run_cli(app, path, *CHAT)
    assert result.exit_code == 1
    assert "not sent:" in result.output and "did not reach TWIN" in result.output
    assert outbox_states() == {"not_taken": 5}


def test_an_answer_dropped_after_accept_is_unknown_and_not_resent(make_sim, make_sim_app, tmp_path):
    sim = make_sim(drop_after_accept_sends=[1], drop_sleep=0)
    app = make_sim_app(sim)
    path = write(tmp_path, csv_text(12))
    first = run_cli(app, path, *CHAT, "--batch-size", "4")
    assert first.exit_code == 1 and "TWIN may have taken them" in first.output
    assert outbox_states() == {"sent": 4, "unknown": 4, "pending": 4}
    assert len(sends_per_phone(sim)) == 8          # TWIN has the 4 unknown ones: they were taken
    second = run_cli(app, path, *CHAT, "--batch-size", "4")
    assert second.exit_code == 1
    assert outbox_states() == {"sent": 8, "unknown": 4}
    counts = sends_per_phone(sim)
    assert len(counts) == 12 and set(counts.values()) == {1}


def test_a_run_stopped_while_it_waits_for_a_call_slot_leaves_the_rows_pending(sim, sim_app):
    settings = sim_app.config["SETTINGS"]
    chat = destinations.chat_settings(CHAT_JSON)
    rows = destinations.read_csv(csv_text(3))

    def interrupted_wait(endpoint):       # Ctrl-C (or a kill) while TWIN24_MAX_CALLS_PER_MINUTE is spent
        raise KeyboardInterrupt

    client = TwinClient(settings, pacer=interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        sending.Sender(settings, chat, callback_url="http://x/y", client=client).run(rows)
    assert outbox_states() == {"pending": 3}, "nothing went out: the rows are not of unknown outcome"
    report = sending.Sender(settings, chat, callback_url="http://x/y").run(rows)
    assert report.complete and report.counts["sent"] == 3
    assert set(sends_per_phone(sim).values()) == {1}


def test_a_crash_while_the_request_is_out_leaves_the_rows_unknown(sim, sim_app):
    settings = sim_app.config["SETTINGS"]
    chat = destinations.chat_settings(CHAT_JSON)
    rows = destinations.read_csv(csv_text(3))

    class Crashing:
        def reserve_call(self, endpoint):
            pass

        def send(self, payload):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sending.Sender(settings, chat, callback_url="http://x/y", client=Crashing()).run(rows)
    assert outbox_states() == {"unknown": 3}
    assert Send.get().lease_owner is None           # the claim was released
    # A process killed outright leaves rows in flight: the next run treats them as unknown.
    Outbox.update(state=sending.IN_FLIGHT).execute()
    report = sending.Sender(settings, chat, callback_url="http://x/y").run(rows)
    assert report.counts["unknown"] == 3 and send_requests(sim) == 0
    assert "stopped while the request was out" in report.rows[0].error


def test_a_callback_that_raced_ahead_keeps_its_status_and_gets_the_phone(sim, sim_app):
    settings = sim_app.config["SETTINGS"]
    chat = destinations.chat_settings({**CHAT_JSON, "callbackData": "race"})
    rows = destinations.read_csv(csv_text(2))
    client = sim_app.test_client()

    class Racing:
        real = TwinClient(settings)

        def reserve_call(self, endpoint):
            pass

        def send(self, payload):
            answer = self.real.send(payload)
            response = client.post(f"/callbacks/{CALLBACK_TOKEN}", json={
                "id": answer[0]["id"], "bulkId": answer[0]["bulkId"], "oldStatus": "PENDING",
                "newStatus": "DELIVERED", "newStatusCode": 6, "callbackData": "race"})
            assert response.status_code == 200
            return answer

    report = sending.Sender(settings, chat, callback_url="http://x/y", client=Racing()).run(rows)
    assert report.complete
    first = Message.get_by_id(report.rows[0].message_id)
    assert (first.status, first.stage, first.phone, first.destination_index) == \
        ("DELIVERED", models.STAGE_CHAT_ID, "79990000000", 0)
    second = Message.get_by_id(report.rows[1].message_id)
    assert (second.status, second.phone) == ("CREATED", "79990000001")


def test_changing_the_text_half_way_is_a_new_mailing_with_a_warning(sim, sim_app, tmp_path):
    path = write(tmp_path, csv_text(3))
    assert run_cli(sim_app, path, *CHAT).exit_code == 0
    changed = [*CHAT[:4], "--text", "Hello again", *CHAT[6:]]
    dry = run_cli(sim_app, path, *changed, "--dry-run")
    assert "warning: 3 of these destinations were already sent by send #1" in dry.output
    assert send_requests(sim) == 1


def test_dry_run_sends_and_records_nothing(sim, sim_app, tmp_path):
    result = run_cli(sim_app, write(tmp_path, csv_text(3)), *CHAT, "--dry-run")
    assert result.exit_code == 0 and "would be sent:" in result.output
    assert send_requests(sim) == 0 and Send.select().count() == 0


def test_json_file_and_config_file(sim, sim_app, tmp_path):
    path = write(tmp_path, json.dumps([{"phone": "79990000001", "variables": {"name": "A"}},
                                       {"phone": "79990000002", "name": "B"}]), "list.json")
    config = write(tmp_path, json.dumps({"chat": CHAT_JSON, "callbackData": "json-1"}), "chat.json")
    result = run_cli(sim_app, path, "--config", config)
    assert result.exit_code == 0, result.output
    truth = sim.truth()
    assert [(t["phone"], t["callbackData"], t["chatId"]) for t in truth] == [
        ("79990000001", "json-1", "chan-1"), ("79990000002", "json-1", "chan-1")]


# ------------------------------------------------------------------------------------ the HTTP API
def worker_pass(app) -> int:
    """What the worker loop does for POST /api/sends, with a client like the worker's."""
    settings = app.config["SETTINGS"]
    return sending.send_pending(settings, TwinClient(settings))


def api_body(count: int, **extra) -> dict:
    return {"chat": CHAT_JSON, "callbackData": "api-1",
            "destinations": [{"phone": f"+7999000000{i}", "variables": {"n": str(i)}} for i in range(count)],
            **extra}


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


def test_a_request_that_comes_while_the_worker_sends_is_sent_next(sim, sim_app, send_headers):
    client = sim_app.test_client()
    first, second = api_body(4), api_body(6)           # one mailing: the second adds two phones
    settings = sim_app.config["SETTINGS"]

    class SecondRequestMidway:
        real = TwinClient(settings)

        def reserve_call(self, endpoint):
            pass

        def send(self, payload):
            assert client.post("/api/sends", headers=send_headers, json=second).status_code == 202
            return self.real.send(payload)

    client.post("/api/sends", headers=send_headers, json=first)
    assert sending.send_pending(settings, SecondRequestMidway()) == 4
    assert outbox_states() == {"sent": 4, "pending": 2}
    assert worker_pass(sim_app) == 2
    counts = sends_per_phone(sim)
    assert len(counts) == 6 and set(counts.values()) == {1}


def test_two_workers_at_once_send_each_row_once(make_sim, make_sim_app, send_headers):
    sim = make_sim(slow_rate=1.0, slow_seconds=0.2)     # each send takes a while: the workers overlap
    app = make_sim_app(sim)
    app.test_client().post("/api/sends", headers=send_headers, json=api_body(6, batchSize=2))
    start, results = threading.Barrier(2), []

    def worker():
        with models.db.connection_context():
            start.wait()
            results.append(worker_pass(app))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [0, 6]
    assert send_requests(sim) == 3
    counts = sends_per_phone(sim)
    assert len(counts) == 6 and set(counts.values()) == {1}


def test_a_killed_worker_leaves_its_rows_unknown_and_the_next_sends_the_rest(sim, sim_app, api_headers,
                                                                              send_headers):
    client = sim_app.test_client()
    url = client.post("/api/sends", headers=send_headers, json=api_body(4)).get_json()["url"]
    # A worker killed (kill -9) while its request carried the first two rows: in flight, lease held.
    first_two = [row.id for row in Outbox.select().order_by(Outbox.id).limit(2)]
    Outbox.update(state=sending.IN_FLIGHT, batch=1).where(Outbox.id.in_(first_two)).execute()
    Send.update(lease_owner="killed", lease_until=models.utcnow() + dt.timedelta(minutes=5)).execute()
    assert client.get(url, headers=api_headers).get_json()["status"] == "sending"
    assert worker_pass(sim_app) == 0                 # its claim still holds

    Send.update(lease_until=models.utcnow() - dt.timedelta(seconds=1)).execute()   # ...and then expires
    assert worker_pass(sim_app) == 2
    report = client.get(url, headers=api_headers).get_json()
    assert [r["state"] for r in report["rows"]] == ["unknown", "unknown", "sent", "sent"]
    assert "stopped while the request was out" in report["rows"][0]["error"]
    assert report["status"] == "done"
    assert sorted(sends_per_phone(sim)) == ["79990000002", "79990000003"]


def refuse_message_inserts(on: bool) -> None:
    """A real database fault while TWIN's answer is stored: inserts into `message` fail (a full disk)."""
    sqlite = isinstance(models.db.obj, SqliteDatabase)
    if not on:
        models.db.execute_sql("DROP TRIGGER refuse_message" + ("" if sqlite else " ON message"))
    elif sqlite:
        models.db.execute_sql("CREATE TRIGGER refuse_message BEFORE INSERT ON message "
                              "BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END")
    else:
        models.db.execute_sql("CREATE OR REPLACE FUNCTION refuse_message() RETURNS trigger LANGUAGE plpgsql "
                              "AS $$ BEGIN RAISE EXCEPTION 'disk full (test)'; END $$")
        models.db.execute_sql("CREATE TRIGGER refuse_message BEFORE INSERT ON message "
                              "FOR EACH ROW EXECUTE FUNCTION refuse_message()")


def test_twins_answer_outlives_a_failed_store(sim, sim_app, api_headers, caplog, send_headers):
    client = sim_app.test_client()
    url = client.post("/api/sends", headers=send_headers, json=api_body(3, batchSize=2)).get_json()["url"]
    refuse_message_inserts(True)
    with caplog.at_level(logging.WARNING, logger="receiver.sending"), pytest.raises(DatabaseError):
        worker_pass(sim_app)
    refuse_message_inserts(False)
    truth = {t["phone"]: t["id"] for t in sim.truth()}
    assert len(truth) == 2
    # The log says so, with counts and no phone number (the ids are in outbox.answer)...
    warning = next(r.getMessage() for r in caplog.records if "storing its answer failed" in r.getMessage())
    assert "took 2 destinations" in warning and "kept in outbox.answer" in warning
    assert not any(phone[-7:] in warning for phone in truth)
    # ...and the next pass stores them from the kept answer, sends the rest, and resends nothing.
    assert worker_pass(sim_app) == 1
    report = client.get(url, headers=api_headers).get_json()
    assert report["complete"], report
    truth = {t["phone"]: t["id"] for t in sim.truth()}
    assert {r["phone"]: r["messageId"] for r in report["rows"]} == truth
    assert {m.id: m.phone for m in Message.select()} == {v: k for k, v in truth.items()}
    counts = sends_per_phone(sim)
    assert len(counts) == 3 and set(counts.values()) == {1}


def refuse_answer_writes(on: bool) -> None:
    """A real database fault on the small write that keeps TWIN's answer (outbox.answer) too."""
    sqlite = isinstance(models.db.obj, SqliteDatabase)
    if not on:
        models.db.execute_sql("DROP TRIGGER refuse_answer" + ("" if sqlite else " ON outbox"))
    elif sqlite:
        models.db.execute_sql("CREATE TRIGGER refuse_answer BEFORE UPDATE OF answer ON outbox "
                              "WHEN NEW.answer IS NOT NULL BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END")
    else:
        models.db.execute_sql("CREATE OR REPLACE FUNCTION refuse_answer() RETURNS trigger LANGUAGE plpgsql "
                              "AS $$ BEGIN RAISE EXCEPTION 'disk full (test)'; END $$")
        models.db.execute_sql("CREATE TRIGGER refuse_answer BEFORE UPDATE OF answer ON outbox FOR EACH ROW "
                              "WHEN (NEW.answer IS NOT NULL) EXECUTE FUNCTION refuse_answer()")


def test_an_answer_kept_nowhere_is_logged_by_outbox_row_never_by_phone(sim, sim_app, send_headers, caplog):
    client = sim_app.test_client()
    client.post("/api/sends", headers=send_headers, json=api_body(2))
    refuse_answer_writes(True)
    with caplog.at_level(logging.DEBUG, logger="receiver"), pytest.raises(DatabaseError):
        worker_pass(sim_app)
    refuse_answer_writes(False)

    truth = {t["phone"]: t["id"] for t in sim.truth()}
    rows = {row.phone: row.id for row in Outbox.select()}
    text = "\n".join(r.getMessage() for r in caplog.records)
    # The copy of last resort names each row by its outbox id, which the documented UPDATE uses.
    assert all(f"{rows[phone]}={message_id}" in text for phone, message_id in truth.items()), text
    assert not any(phone in text for phone in truth)


def test_api_takes_large_lists_and_dry_runs_them(sim, sim_app, send_headers):
    body = {"chat": CHAT_JSON, "dryRun": True,
            "destinations": [{"phone": str(79990000000 + i), "variables": {"name": "x" * 20}}
                             for i in range(3000)]}
    assert len(json.dumps(body)) > sim_app.config["MAX_CONTENT_LENGTH"]
    response = sim_app.test_client().post("/api/sends", headers=send_headers, json=body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["counts"]["pending"] == 3000
    assert send_requests(sim) == 0 and Send.select().count() == 0


# ------------------------------------------------------------------------------------ refused destinations
REFUSAL = "Recipient 79990000001 cannot receive messages on this channel"     # the simulator's message


def test_a_refused_destination_is_recorded_alone_and_the_run_goes_on(make_sim, make_sim_app, tmp_path):
    sim = make_sim(refuse_phones=["79990000001"])
    app = make_sim_app(sim)
    path = write(tmp_path, csv_text(5))                 # phones 79990000000-4 on lines 2-6
    first = run_cli(app, path, *CHAT, "--batch-size", "3")
    assert first.exit_code == 1, first.output           # not every row went out
    assert send_requests(sim) == 2 and "stopped" not in first.output
    rows = {row.phone: row for row in Outbox.select()}
    refused = rows.pop("79990000001")
    assert (refused.state, refused.message_id, refused.error) == ("refused", None, REFUSAL)
    kept = json.loads(refused.answer)                   # TWIN's whole item, its internals included
    assert kept["id"] is None and set(kept["error"]) == {"message", "file", "line", "trace"}
    # The others of the same request keep their ids, matched by position.
    truth = {t["phone"]: t["id"] for t in sim.truth()}
    assert {phone: row.message_id for phone, row in rows.items()} == truth and len(truth) == 4
    assert {row.state for row in rows.values()} == {"sent"}
    assert Message.select().where(Message.phone == "79990000001").count() == 0
    assert "refused by TWIN:" in first.output and "(lines 3)  this destination only; never resent" in first.output
    assert f"line 3, 79990000001: {REFUSAL}" in first.output
    assert "file" not in refused.error and "trace" not in first.output

    # Neither a rerun nor --resend-unknown sends it again.
    for extra in ((), ("--resend-unknown",)):
        again = run_cli(app, path, *CHAT, "--batch-size", "3", *extra)
        assert again.exit_code == 1 and "refused by TWIN:" in again.output
    assert send_requests(sim) == 2 and outbox_states() == {"sent": 4, "refused": 1}
    dry = run_cli(app, path, *CHAT, "--dry-run")
    assert "refused by TWIN:" in dry.output and "would be sent" not in dry.output


def test_an_answer_item_with_neither_id_nor_error_is_unknown_and_stops_the_run(sim, sim_app):
    settings = sim_app.config["SETTINGS"]
    chat = destinations.chat_settings({**CHAT_JSON, "callbackData": "blank"})

    class BlankedId:
        real = TwinClient(settings)

        def reserve_call(self, endpoint):
            pass

        def send(self, payload):
            answer = self.real.send(payload)
            return [answer[0], {**answer[1], "id": None}, *answer[2:]]

    rows = destinations.read_csv(csv_text(4))
    report = sending.Sender(settings, chat, callback_url="http://x/y", client=BlankedId(), batch_size=2).run(rows)
    assert [r.state for r in report.rows] == ["sent", "unknown", "pending", "pending"]
    assert report.failure_kind == "unknown" and "neither an id nor an error" in report.failure
    assert report.rows[1].error == "TWIN's answer has no id and no error for this destination"
    assert send_requests(sim) == 1


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


# ------------------------------------------------------------------------------------ options, limits
def test_options_reach_twin_and_a_new_send_at_continues_the_mailing(sim, sim_app, tmp_path):
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).replace(microsecond=0)
    config = write(tmp_path, json.dumps({
        **CHAT_JSON, "callbackData": "opts", "validityPeriod": 120, "continueLastOrStartNewSession": True,
        "templateId": "tpl-9", "useShortLinks": True, "sendAt": soon.isoformat(),
        "allowedTimeRanges": [["09:00:00", "18:00:00"]]}), "chat.json")
    path = write(tmp_path, "phone,messengerUserId,externalId,name\n79990000001,,crm-1,A\n,wa-2,crm-2,B\n")
    first = run_cli(sim_app, path, "--config", config)
    assert first.exit_code == 0, first.output
    one, two = sim.world.messages
    assert one.options == {"templateId": "tpl-9", "useShortLinks": True, "sendAt": soon.isoformat(),
                           "allowedTimeRanges": [["09:00:00", "18:00:00"]]}
    assert (one.chat["validityPeriod"], one.chat["continueLastOrStartNewSession"]) == (120, True)
    assert one.destination == {"phone": "79990000001", "externalId": "crm-1", "variables": {"name": "A"}}
    assert two.destination == {"messengerUserId": "wa-2", "externalId": "crm-2", "variables": {"name": "B"}}
    rows = list(Outbox.select().order_by(Outbox.row_index))
    assert [(r.phone, r.messenger_user_id, r.external_id, r.state) for r in rows] == [
        ("79990000001", None, "crm-1", "sent"), ("muid:wa-2", "wa-2", "crm-2", "sent")]

    # Later, one more destination and another time: only the new one goes out, with this run's options.
    later = (soon + dt.timedelta(days=1)).isoformat()
    longer = write(tmp_path, open(path, encoding="utf-8").read() + ",wa-3,,C\n", "more.csv")
    second = run_cli(sim_app, longer, "--config", config, "--send-at", later, "--validity-period", "30",
                     "--no-use-short-links", "--allowed-time-ranges", "10:00:00-12:00:00, 13:00:00-17:00:00")
    assert second.exit_code == 0, second.output
    assert "sent earlier:" in second.output and send_requests(sim) == 2 and Send.select().count() == 1
    three = sim.world.messages[2]
    assert three.destination == {"messengerUserId": "wa-3", "variables": {"name": "C"}}
    assert three.options == {"templateId": "tpl-9", "useShortLinks": False, "sendAt": later,
                             "allowedTimeRanges": [["10:00:00", "12:00:00"], ["13:00:00", "17:00:00"]]}
    assert three.chat["validityPeriod"] == 30
    assert json.loads(Send.get().options)["sendAt"] == later


def test_a_bad_option_is_refused_before_anything_is_stored(sim, sim_app, tmp_path, send_headers):
    path = write(tmp_path, csv_text(2))
    result = run_cli(sim_app, path, *CHAT, "--validity-period", "0", "--send-at", "2020-01-01T00:00:00Z")
    assert result.exit_code == 2
    assert "chat settings, validityPeriod: must be a whole number of minutes from 1 to 2880" in result.output
    assert "chat settings, sendAt: 2020-01-01T00:00:00Z is in the past" in result.output
    response = sim_app.test_client().post("/api/sends", headers=send_headers, json={
        **api_body(2), "chat": {**CHAT_JSON, "continueLastOrStartNewSession": "yes"},
        "allowedTimeRanges": [["18:00:00", "09:00:00"]], "destinations": [{"messengerUserId": "u"}] * 2})
    assert response.status_code == 422
    problems = {(p["where"], p["field"]) for p in response.get_json()["problems"]}
    assert problems == {("chat", "continueLastOrStartNewSession"), ("chat", "allowedTimeRanges"),
                        ("item 2", "messengerUserId")}
    assert send_requests(sim) == 0 and Send.select().count() == 0


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


def test_twins_size_limits_are_checked_before_any_call(sim, make_sim_app, tmp_path, send_headers):
    path = write(tmp_path, csv_text(2))
    public_url = "http://127.0.0.1:1/" + "p" * 3970
    long_url = make_sim_app(sim, public_url=public_url)
    size = len(f"{public_url}/callbacks/{CALLBACK_TOKEN}")
    result = run_cli(long_url, path, *CHAT)
    assert result.exit_code == 2 and "nothing was sent" in result.output
    assert f"settings, callbackUrl: is {size} bytes; TWIN takes at most 4000" in result.output
    assert "shorten PUBLIC_URL" in result.output
    response = long_url.test_client().post("/api/sends", headers=send_headers, json=api_body(2))
    assert response.status_code == 422
    assert [(p["where"], p["field"]) for p in response.get_json()["problems"]] == [("settings", "callbackUrl")]

    app = make_sim_app(sim)
    big = "я" * 5121                                        # 10,242 bytes of UTF-8
    result = run_cli(app, path, *CHAT[:-2], "--callback-data", big)
    assert result.exit_code == 2
    assert "chat settings, callbackData: is 10242 bytes (UTF-8); TWIN takes at most 10240" in result.output
    response = app.test_client().post("/api/sends", headers=send_headers, json={**api_body(2), "callbackData": big})
    assert response.status_code == 422
    assert [(p["where"], p["field"]) for p in response.get_json()["problems"]] == [("chat", "callbackData")]
    assert send_requests(sim) == 0 and Send.select().count() == 0


# ------------------------------------------------------------------------------------ end to end
def test_send_callbacks_enrichment_results(make_sim, database_url, live_app, tmp_path):
    sim = make_sim(**SIM_QUICK)
    app = create_app(sim_settings(database_url, sim, public_url=live_app.url))
    path = write(tmp_path, csv_text(6))
    result = run_cli(app, path, *CHAT)
    assert result.exit_code == 0, result.output
    assert sim.wait_idle(15)
    calls = sim.calls()["callback"]
    assert calls.get("200", 0) == 12 and not calls.get("gave_up")   # PENDING + DELIVERED for each
    truth = {t["phone"]: t for t in sim.truth()}

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        Worker.from_app(app).run(once=True)
        if Message.select().where(Message.stage == models.STAGE_DONE).count() == 6:
            break
        time.sleep(0.2)
    assert Counter(m.stage for m in Message.select()) == {models.STAGE_DONE: 6}

    rows = models.db.execute_sql("SELECT message_id, phone, status, chat_id, result FROM results").fetchall()
    assert len(rows) == 6
    for message_id, phone, status, chat_id, result in rows:
        assert truth[phone]["id"] == message_id and status == "DELIVERED"
        assert chat_id == truth[phone]["sessionId"]
        assert json.loads(result)["confirmation"] == truth[phone]["result"]["confirmation"]
