"""`python -m receiver rejected`: refused callbacks listed by reason, and replayed through the endpoint's
own reader after a fix, idempotently."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from receiver.models import Event, Message, Rejected

from .support import settings_env

ROOT = Path(__file__).resolve().parent.parent
# Bodies the receiver refused before it read statuses from codes, commas in prices and arrays: kept as
# it kept them (reason and detail of the time), waiting for a replay.
OLD_REFUSALS = [
    ("wrong_type", "'price' must be a finite number, got a string", "application/json",
     b'{"id":"m1","newStatusCode":6,"price":"2,5"}'),
    ("wrong_type", "'id' must be a string, got a number", "application/json",
     b'{"id":12345,"oldStatus":"CREATED","newStatus":"PENDING","callbackData":"\xd0\x9e\xd0\xbf\xd1\x80\xd0\xbe\xd1\x81"}'),
    ("not_an_object", "expected a JSON object, got an array", "application/json; charset=utf-8",
     b'[{"id":"m2","newStatus":"DELIVERED"},{"id":"m3","newStatusCode":2}]'),
    ("wrong_type", "'partCount' must be a whole number, got a string", "application/x-www-form-urlencoded",
     b"id=m4&newStatus=UNDELIVERED&partCount=x&price=0%2C75"),
]


def keep(reason, detail, content_type, body, received_at=None, method="POST", truncated=False) -> int:
    return Rejected.create(reason=reason, detail=detail, content_type=content_type, body=body, method=method,
                           content_length=len(body), body_truncated=truncated, remote_addr="10.0.0.7",
                           received_at=received_at or dt.datetime(2025, 3, 1, 12, 0)).id


def run(app, *args):
    result = app.test_cli_runner().invoke(args=["rejected", *args])
    return result.exit_code, result.output.splitlines()


def test_list_groups_refusals_by_reason_with_counts_and_times(app, client, callback_path):
    client.post(callback_path, json={"newStatus": "DELIVERED", "callbackData": "без id"})
    client.post(callback_path, json={"newStatus": "PENDING"})
    client.post(callback_path, data="{nope", content_type="application/json")
    client.get(callback_path)

    code, lines = run(app, "list")

    assert code == 0
    assert lines[0].split() == ["reason", "kept", "unresolved", "first", "(UTC)", "last", "(UTC)"]
    rows = [line.split()[:3] for line in lines[1:]]
    assert rows == [["missing_field", "2", "2"], ["method_not_allowed", "1", "1"], ["unparsable_json", "1", "1"]]
    first, last = Rejected.select().order_by(Rejected.id)[:2]
    assert lines[1].endswith(f"{first.received_at:%Y-%m-%d %H:%M:%S}  {last.received_at:%Y-%m-%d %H:%M:%S}")


def test_list_of_a_reason_shows_its_rows_and_the_start_of_each_body(app, client, callback_path):
    client.post(callback_path, json={"newStatus": "DELIVERED", "callbackData": "без id", "pad": "x" * 200})
    kept = Rejected.get()

    code, lines = run(app, "list", "--reason", "missing_field")

    assert code == 0
    assert lines[0] == (f"#{kept.id} {kept.received_at:%Y-%m-%d %H:%M:%S} missing_field (not replayed): "
                        "'id' is required")
    assert lines[1].startswith('    {"newStatus": "DELIVERED", "callbackData": "без id"') and lines[1].endswith("...")
    assert run(app, "list", "--reason", "nothing_like_it")[1] == ["no refused callbacks are kept with reason "
                                                                   "nothing_like_it"]


def test_an_empty_table_says_so(app):
    assert run(app, "list") == (0, ["no refused callbacks are kept"])


def test_what_the_old_code_refused_is_stored_by_a_replay_and_a_second_replay_is_a_duplicate(app):
    ids = [keep(*refusal) for refusal in OLD_REFUSALS]

    code, lines = run(app, "replay", "--reason", "wrong_type")

    assert code == 0, lines
    assert lines == [f"#{ids[0]} (wrong_type): stored: message m1 DELIVERED",
                     f"#{ids[1]} (wrong_type): stored: message 12345 PENDING",
                     f"#{ids[3]} (wrong_type): stored: message m4 UNDELIVERED",
                     "replayed 3 kept refusals: 3 stored, 0 duplicate, 0 still refused, 0 not replayable"]
    m1 = Message.get_by_id("m1")
    assert (m1.status, m1.status_code, m1.price, m1.stage) == ("DELIVERED", 6, 2.5, "chat_id")
    assert (Message.get_by_id("12345").status, Message.get_by_id("12345").callback_data) == ("PENDING", "Опрос")
    m4 = Message.get_by_id("m4")
    assert (m4.status, m4.part_count, m4.price) == ("UNDELIVERED", None, 0.75)
    event = Event.get(Event.message_id == "m1")
    assert (event.raw, event.content_type, event.remote_addr) == (
        OLD_REFUSALS[0][3].decode(), "application/json", "10.0.0.7"), "the event is the kept request's"

    code, lines = run(app, "replay", "--id", str(ids[0]))

    assert lines == [f"#{ids[0]} (wrong_type): duplicate: message m1 DELIVERED",
                     "replayed 1 kept refusals: 0 stored, 1 duplicate, 0 still refused, 0 not replayable"]
    assert Event.select().where(Event.message_id == "m1").count() == 1
    marks = {row.id: row.replay_outcome for row in Rejected.select()}
    assert marks == {ids[0]: "duplicate", ids[1]: "stored", ids[2]: None, ids[3]: "stored"}
    assert all(row.replayed_at for row in Rejected.select() if row.id != ids[2])
    code, lines = run(app, "list")
    assert [line.split()[:3] for line in lines[1:]] == [["wrong_type", "3", "0"], ["not_an_object", "1", "1"]]
    _, lines = run(app, "list", "--reason", "wrong_type")
    assert lines[0].startswith(f"#{ids[0]} 2025-03-01 12:00:00 wrong_type (replayed ")
    assert lines[0].endswith(": duplicate): 'price' must be a finite number, got a string")


def test_an_array_the_old_code_refused_is_replayed_item_by_item(app):
    row_id = keep(*OLD_REFUSALS[2])

    code, lines = run(app, "replay", "--id", str(row_id))

    assert lines == [f"#{row_id} (not_an_object): stored: message m2 DELIVERED",
                     f"#{row_id} (not_an_object): stored: message m3 PENDING",
                     "replayed 1 kept refusals: 2 stored, 0 duplicate, 0 still refused, 0 not replayable"]
    assert {m.id: m.status for m in Message.select()} == {"m2": "DELIVERED", "m3": "PENDING"}


def test_what_is_still_refused_says_why_and_stays_unresolved(app, client, callback_path):
    client.post(callback_path, json=[{"id": "m9", "newStatus": "PENDING"}, {"newStatus": "PENDING"}])
    client.post(callback_path, json={"newStatusCode": 6})
    array_item, lone = Rejected.select().order_by(Rejected.id)
    row_id = keep("not_an_object", "expected a JSON object, got an array", "application/json",
                  b'[{"id":"m8","newStatus":"PENDING"},{"newStatus":"PENDING"}]')

    code, lines = run(app, "replay", "--reason", "missing_field")
    assert code == 0
    assert lines == [f"#{array_item.id} (missing_field): still refused: missing_field: 'id' is required",
                     f"#{lone.id} (missing_field): still refused: missing_field: 'id' is required",
                     "replayed 2 kept refusals: 0 stored, 0 duplicate, 2 still refused, 0 not replayable"]

    code, lines = run(app, "replay", "--id", str(row_id))
    assert lines == [f"#{row_id} (not_an_object): stored: message m8 PENDING",
                     f"#{row_id} (not_an_object): still refused: missing_field: item 1: 'id' is required",
                     "replayed 1 kept refusals: 1 stored, 0 duplicate, 1 still refused, 0 not replayable"]
    assert Rejected.get_by_id(row_id).replay_outcome == "partial: 1 refused"
    assert Rejected.get_by_id(lone.id).replay_outcome == "refused: missing_field"
    _, lines = run(app, "list")
    assert [line.split()[:3] for line in lines[1:]] == [["missing_field", "2", "2"], ["not_an_object", "1", "1"]]


def test_a_refusal_whose_body_was_not_kept_whole_is_not_replayable(app, client, callback_path):
    client.get(callback_path)
    client.post(callback_path, data=json.dumps({"id": "m1", "newStatus": "DELIVERED", "pad": "x" * 70_000}),
                content_type="application/json")
    truncated = keep("wrong_type", "'price' must be a finite number", "application/json", b'{"id":"m1","newSt',
                     truncated=True)
    method, too_large = (Rejected.get(Rejected.reason == reason) for reason in ("method_not_allowed",
                                                                                "payload_too_large"))

    lines = [run(app, "replay", "--id", str(row_id))[1][0] for row_id in (method.id, too_large.id, truncated)]

    assert lines == [
        f"#{method.id} (method_not_allowed): not replayable: a GET request carries no callback",
        f"#{too_large.id} (payload_too_large): not replayable: the body was larger than MAX_BODY_BYTES and was "
        "not kept",
        f"#{truncated} (wrong_type): not replayable: only the first REJECTED_BODY_CAP bytes of the body were kept"]
    assert Message.select().count() == 0
    assert [row.replayed_at for row in Rejected.select()] == [None, None, None]


def test_a_time_range_replays_what_was_refused_within_it(app):
    at = [dt.datetime(2025, 3, 1, 10, 0), dt.datetime(2025, 3, 1, 11, 0), dt.datetime(2025, 3, 1, 12, 0)]
    ids = [keep("wrong_type", "old", "application/json", f'{{"id":"t{n}","newStatusCode":6}}'.encode(), moment)
           for n, moment in enumerate(at)]

    code, lines = run(app, "replay", "--since", "2025-03-01T13:30:00+03:00", "--until", "2025-03-01T12:00:00Z")

    assert code == 0
    assert lines == [f"#{ids[1]} (wrong_type): stored: message t1 DELIVERED",
                     "replayed 1 kept refusals: 1 stored, 0 duplicate, 0 still refused, 0 not replayable"]
    assert [m.id for m in Message.select()] == ["t1"]


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "say what to replay: --id, --reason, or --since/--until"),
    (["--since", "yesterday"], 2, "Invalid value for --since: expected an ISO 8601 date or date-time"),
    (["--id", "999"], 1, "Error: no kept refusal #999"),
])
def test_replay_refuses_an_unclear_selection(app, args, code, message):
    exit_code, lines = run(app, "replay", *args)

    assert exit_code == code
    assert any(message in line for line in lines), lines


def test_the_command_runs_as_an_operator_runs_it(settings, app, client, callback_path):
    client.post(callback_path, json={"newStatus": "PENDING"})

    run_ = subprocess.run([sys.executable, "-m", "receiver", "rejected", "list"], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True, timeout=60)

    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.splitlines()[1].split()[:3] == ["missing_field", "1", "1"]
