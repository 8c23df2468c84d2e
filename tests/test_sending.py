"""Sending (receiver/sending.py) against the simulator: the Sender, send_pending (the worker's side of
POST /api/sends), the checks both faces make before anything is sent, and one mailing end to end.
The faces: tests/test_sending_cli.py (`flask send`), tests/test_sending_api.py (POST /api/sends);
the input's own rules: tests/test_destinations.py."""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter

import pytest
from peewee import DatabaseError, SqliteDatabase

from receiver import create_app, destinations, models, sending
from receiver.db import db, utcnow
from receiver.models import Message, Outbox, Send
from receiver.twin24 import TwinClient
from receiver.worker import Worker

from .support import (
    CALLBACK_TOKEN,
    CHAT,
    CHAT_JSON,
    QUIET,
    SIM_QUICK,
    api_body,
    closed_port,
    csv_text,
    outbox_states,
    run_cli,
    send_requests,
    sends_per_phone,
    sim_settings,
    worker_pass,
    write,
)

SIM_DEFAULTS = QUIET        # no callbacks while a test runs, unless it asks for them


# ---------------------------------------------------------------------------------------- reports
def test_line_ranges():
    assert sending.line_ranges([5, 2, 3, 4, 9, 11, 12]) == "2-5, 9, 11-12"


# ------------------------------------------------------------------------------------- the Sender
class Unpaced:
    """A stand-in for the Sender's TWIN client whose calls take no slot of the call budget (these tests
    are not about it); `real`, given settings, is a client of the simulator to pass sends on to."""

    def __init__(self, settings=None):
        self.real = TwinClient(settings) if settings is not None else None

    def reserve_call(self, endpoint):
        pass


class FlakyClient(Unpaced):
    """A real client, except that the send numbered `fail_at` goes to a port nothing listens on."""

    def __init__(self, settings, fail_at: int):
        super().__init__(settings)
        self.dead = TwinClient(sim_like(settings, twin24_notify_url=f"http://127.0.0.1:{closed_port()}"))
        self.dead.backoff_base = 0.001
        self.fail_at, self.count = fail_at, 0

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

    class Crashing(Unpaced):
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

    class Racing(Unpaced):
        def send(self, payload):
            answer = self.real.send(payload)
            response = client.post(f"/callbacks/{CALLBACK_TOKEN}", json={
                "id": answer[0]["id"], "bulkId": answer[0]["bulkId"], "oldStatus": "PENDING",
                "newStatus": "DELIVERED", "newStatusCode": 6, "callbackData": "race"})
            assert response.status_code == 200
            return answer

    report = sending.Sender(settings, chat, callback_url="http://x/y", client=Racing(settings)).run(rows)
    assert report.complete
    first = Message.get_by_id(report.rows[0].message_id)
    assert (first.status, first.stage, first.phone, first.destination_index) == \
        ("DELIVERED", models.STAGE_CHAT_ID, "79990000000", 0)
    second = Message.get_by_id(report.rows[1].message_id)
    assert (second.status, second.phone) == ("CREATED", "79990000001")


def test_an_answer_item_with_neither_id_nor_error_is_unknown_and_stops_the_run(sim, sim_app):
    settings = sim_app.config["SETTINGS"]
    chat = destinations.chat_settings({**CHAT_JSON, "callbackData": "blank"})

    class BlankedId(Unpaced):
        def send(self, payload):
            answer = self.real.send(payload)
            return [answer[0], {**answer[1], "id": None}, *answer[2:]]

    rows = destinations.read_csv(csv_text(4))
    report = sending.Sender(settings, chat, callback_url="http://x/y", client=BlankedId(settings), batch_size=2).run(rows)
    assert [r.state for r in report.rows] == ["sent", "unknown", "pending", "pending"]
    assert report.failure_kind == "unknown" and "neither an id nor an error" in report.failure
    assert report.rows[1].error == "TWIN's answer has no id and no error for this destination"
    assert send_requests(sim) == 1


# --------------------------------------------------------------- the worker's pass (send_pending)
def test_a_request_that_comes_while_the_worker_sends_is_sent_next(sim, sim_app, send_headers):
    client = sim_app.test_client()
    first, second = api_body(4), api_body(6)           # one mailing: the second adds two phones
    settings = sim_app.config["SETTINGS"]

    class SecondRequestMidway(Unpaced):
        def send(self, payload):
            assert client.post("/api/sends", headers=send_headers, json=second).status_code == 202
            return self.real.send(payload)

    client.post("/api/sends", headers=send_headers, json=first)
    assert sending.send_pending(settings, SecondRequestMidway(settings)) == 4
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
        with db.connection_context():
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
    Send.update(lease_owner="killed", lease_until=utcnow() + dt.timedelta(minutes=5)).execute()
    assert client.get(url, headers=api_headers).get_json()["status"] == "sending"
    assert worker_pass(sim_app) == 0                 # its claim still holds

    Send.update(lease_until=utcnow() - dt.timedelta(seconds=1)).execute()   # ...and then expires
    assert worker_pass(sim_app) == 2
    report = client.get(url, headers=api_headers).get_json()
    assert [r["state"] for r in report["rows"]] == ["unknown", "unknown", "sent", "sent"]
    assert "stopped while the request was out" in report["rows"][0]["error"]
    assert report["status"] == "done"
    assert sorted(sends_per_phone(sim)) == ["79990000002", "79990000003"]


def refuse_writes(trigger: str, on: bool, table: str, event: str, condition: str | None = None) -> None:
    """A real database fault (a full disk): while on, `event` ("INSERT", "UPDATE OF answer") on `table`
    fails, where `condition` (SQL on NEW) holds if given. Both backends, through a trigger named `trigger`."""
    sqlite = isinstance(db.obj, SqliteDatabase)
    when = f" WHEN ({condition})" if condition else ""
    if not on:
        db.execute_sql(f"DROP TRIGGER {trigger}" + ("" if sqlite else f" ON {table}"))
    elif sqlite:
        db.execute_sql(f"CREATE TRIGGER {trigger} BEFORE {event} ON {table}{when} "
                              "BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END")
    else:
        db.execute_sql(f"CREATE OR REPLACE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql "
                              "AS $$ BEGIN RAISE EXCEPTION 'disk full (test)'; END $$")
        db.execute_sql(f"CREATE TRIGGER {trigger} BEFORE {event} ON {table} FOR EACH ROW{when} "
                              f"EXECUTE FUNCTION {trigger}()")


def refuse_message_inserts(on: bool) -> None:
    """A real database fault while TWIN's answer is stored: inserts into `message` fail (a full disk)."""
    refuse_writes("refuse_message", on, "message", "INSERT")


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
    refuse_writes("refuse_answer", on, "outbox", "UPDATE OF answer", "NEW.answer IS NOT NULL")


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


# --------------------------------------------------------- checked at both faces, before any call
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


# ------------------------------------------------------------------------------------- end to end
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

    rows = db.execute_sql("SELECT message_id, phone, status, chat_id, result FROM results").fetchall()
    assert len(rows) == 6
    for message_id, phone, status, chat_id, result in rows:
        assert truth[phone]["id"] == message_id and status == "DELIVERED"
        assert chat_id == truth[phone]["sessionId"]
        assert json.loads(result)["confirmation"] == truth[phone]["result"]["confirmation"]
