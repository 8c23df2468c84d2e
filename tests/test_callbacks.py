"""The callback endpoint, as TWIN and a careless proxy would use it."""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
import requests

from receiver import callbacks
from receiver.models import Event, Fact, Message, Rejected

from .support import CALLBACK_TOKEN, callback_body

EXAMPLES = Path(__file__).with_name("examples")


def stored_messages():
    return {m.id: m for m in Message.select()}


def test_a_callback_is_stored_with_its_message(client, callback_path):
    answer = client.post(callback_path, json=callback_body())

    assert answer.status_code == 200
    assert answer.json == {"stored": True, "duplicate": False}
    message = Message.get_by_id("m-1")
    assert (message.status, message.status_code, message.callback_data) == ("PENDING", 2, "mailing-7")
    assert (message.bulk_id, message.group_id, message.flow_id) == ("bulk-1", "group-1", "flow-1")
    assert message.stage == "none"
    event = Event.get()
    assert (event.message_id, event.old_status, event.new_status) == ("m-1", "CREATED", "PENDING")
    assert json.loads(event.raw) == callback_body()


def test_the_raw_body_is_kept_byte_for_byte_with_unknown_fields(client, callback_path):
    raw = '{"id":"m-1", "newStatus":"PENDING",  "surprise": {"nested": [1, 2]}, "callbackData": "x"}'

    client.post(callback_path, data=raw, content_type="application/json")

    assert Event.get().raw == raw


def test_an_exact_repeat_is_recorded_once(client, callback_path):
    first = client.post(callback_path, json=callback_body())
    again = client.post(callback_path, json=callback_body())

    assert first.json["duplicate"] is False
    assert again.status_code == 200 and again.json["duplicate"] is True
    assert Event.select().count() == 1


def test_status_never_goes_backwards_when_callbacks_arrive_out_of_order(client, callback_path):
    client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED"))
    client.post(callback_path, json=callback_body(old="CREATED", new="PENDING"))

    message = Message.get_by_id("m-1")
    assert (message.status, message.status_code) == ("DELIVERED", 6)
    assert message.stage == "chat_id", "a DELIVERED message is queued for its chat session"
    assert [e.new_status for e in Event.select().order_by(Event.id)] == ["DELIVERED", "PENDING"]


def test_a_late_failure_does_not_undo_a_delivery(client, callback_path):
    client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED"))
    client.post(callback_path, json=callback_body(old="PENDING", new="UNDELIVERED"))

    assert Message.get_by_id("m-1").status == "DELIVERED"


def test_an_unknown_status_is_stored_and_ranked_before_final_ones(client, callback_path):
    client.post(callback_path, json=callback_body(old="PENDING", new="QUEUED_AT_OPERATOR"))
    assert Message.get_by_id("m-1").status == "QUEUED_AT_OPERATOR"

    client.post(callback_path, json=callback_body(old="QUEUED_AT_OPERATOR", new="DELIVERED"))
    client.post(callback_path, json=callback_body(old="PENDING", new="SOMETHING_ELSE"))
    assert Message.get_by_id("m-1").status == "DELIVERED"


@pytest.mark.parametrize("value, stored", [
    ("123", "123"),
    ('"id":"23233"', '"id":"23233"'),          # TWIN's own captured example, quotes inside
    ("Рассылка №5, ноябрь", "Рассылка №5, ноябрь"),
    (123, "123"),                              # a number where a string was expected: kept as text
    (None, None),
])
def test_callback_data_is_opaque_text_kept_verbatim(client, callback_path, value, stored):
    client.post(callback_path, json=callback_body(callbackData=value))

    assert Message.get_by_id("m-1").callback_data == stored
    assert Event.get().callback_data == stored


def test_one_callback_data_covers_many_messages(client, callback_path, api_headers):
    for n in range(3):
        client.post(callback_path, json=callback_body(message_id=f"m-{n}", callbackData="Акция 1"))
    client.post(callback_path, json=callback_body(message_id="other", callbackData="Акция 2"))

    answer = client.get("/api/messages", query_string={"callbackData": "Акция 1"}, headers=api_headers)

    assert answer.status_code == 200
    assert sorted(m["id"] for m in answer.json["messages"]) == ["m-0", "m-1", "m-2"]
    assert answer.json["messages"][0]["history"][0]["new_status"] == "PENDING"


def test_a_form_encoded_callback_is_accepted_when_its_fields_are_there(client, callback_path):
    answer = client.post(callback_path, data={"id": "m-9", "newStatus": "DELIVERED", "newStatusCode": "6",
                                              "price": "1.25", "callbackData": "форма"})

    assert answer.status_code == 200
    message = Message.get_by_id("m-9")
    assert (message.status, message.status_code, message.price, message.callback_data) == (
        "DELIVERED", 6, 1.25, "форма")


BAD_INPUTS = [
    # (name, request kwargs, expected status, expected reason): what names no message or no status.
    ("not json", dict(data="{nope", content_type="application/json"), 400, "unparsable_json"),
    ("json string", dict(json="DELIVERED"), 400, "not_an_object"),
    ("empty array", dict(json=[]), 400, "empty_array"),
    ("NaN price", dict(data='{"id":"m-1","newStatus":"PENDING","price":NaN}', content_type="application/json"),
     400, "unparsable_json"),
    ("missing id", dict(json={"newStatus": "PENDING"}), 422, "missing_field"),
    ("empty id", dict(json=callback_body(id="")), 422, "missing_field"),
    ("missing newStatus", dict(json={"id": "m-1", "oldStatus": "CREATED"}), 422, "missing_field"),
    # Only codes 2 and 6 are confirmed: another code does not name a status.
    ("missing newStatus, unconfirmed code", dict(json={"id": "m-1", "newStatusCode": 7}), 422, "missing_field"),
    ("id is an object", dict(json=callback_body(id={"x": 1})), 422, "wrong_type"),
    ("id is an array", dict(json=callback_body(id=["m-1"])), 422, "wrong_type"),
    ("id is a boolean", dict(json=callback_body(id=True)), 422, "wrong_type"),
    ("newStatus is a number, no code", dict(json={"id": "m-1", "newStatus": 6}), 422, "wrong_type"),
    ("id too long", dict(json=callback_body(id="x" * 500)), 422, "field_too_long"),
    ("xml", dict(data="<id>m-1</id>", content_type="application/xml"), 415, "unsupported_content_type"),
    ("not utf-8", dict(data=b'{"id":"\xff\xfe"}', content_type="application/json"), 400, "bad_encoding"),
    ("empty form", dict(data="", content_type="application/x-www-form-urlencoded"), 422, "missing_field"),
    # Text no database can keep: NUL (PostgreSQL refuses it) and unpaired surrogates (not UTF-8).
    ("NUL in id", dict(data=r'{"id":"m-1\u0000","newStatus":"PENDING"}', content_type="application/json"),
     422, "bad_character"),
    ("surrogate in id", dict(data=r'{"id":"m-\ud800","newStatus":"PENDING"}', content_type="application/json"),
     422, "bad_character"),
    ("NUL in a form's id", dict(data="id=m-1%00&newStatus=PENDING", content_type="application/x-www-form-urlencoded"),
     422, "bad_character"),
    # The raw copy is text: a form body holding a NUL byte cannot be kept on PostgreSQL.
    ("NUL byte in a form", dict(data=b"id=m-1&newStatus=PENDING&note=\x00",
                                content_type="application/x-www-form-urlencoded"), 422, "bad_character"),
    ("too large", dict(data=json.dumps(callback_body(padding="x" * 70_000)), content_type="application/json"),
     413, "payload_too_large"),
]


@pytest.mark.parametrize("name, kwargs, status, reason", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_reason_kept_and_touches_no_message(
        client, callback_path, name, kwargs, status, reason):
    client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED"))
    before = {m.id: m.__data__ for m in Message.select()}

    answer = client.post(callback_path, **kwargs)

    assert answer.status_code == status
    assert answer.json["error"] == reason and answer.json["detail"]
    kept = Rejected.get()
    assert (kept.reason, kept.method) == (reason, "POST")
    assert kept.received_at is not None
    if reason != "payload_too_large":
        assert bytes(kept.body) == (kwargs.get("data") or json.dumps(kwargs.get("json")).encode()
                                    if "data" not in kwargs else _as_bytes(kwargs["data"]))
    assert {m.id: m.__data__ for m in Message.select()} == before
    assert Event.select().count() == 1


def _as_bytes(data):
    return data if isinstance(data, bytes) else data.encode()


TOLERATED = [
    # (name, the callback's body as sent, the message column that must be null, the field named unreadable)
    ("price is a word", json.dumps(callback_body(price="два")), "price", "price"),
    ("price is a boolean", json.dumps(callback_body(price=True)), "price", "price"),
    ("price has 400 digits", json.dumps(callback_body(price=10**400)), "price", "price"),
    # A price PostgreSQL's REAL column cannot hold (over- or underflow) would be a 503 on every retry.
    ("price beyond a REAL", json.dumps(callback_body(price=3.5e38)), "price", "price"),
    ("price below a REAL", json.dumps(callback_body(price=-1e-46)), "price", "price"),
    ("price is an object", json.dumps(callback_body(price={"value": 2.5})), "price", "price"),
    ("partCount is a word", json.dumps(callback_body(partCount="x")), "part_count", "partCount"),
    ("partCount is a superscript digit", json.dumps(callback_body(partCount="²")), "part_count", "partCount"),
    ("partCount is huge", json.dumps(callback_body(partCount=10**30)), "part_count", "partCount"),
    ("bulkId is an array", json.dumps(callback_body(bulkId=[1])), "bulk_id", "bulkId"),
    ("flowId is too long", json.dumps(callback_body(flowId="f" * 500)), "flow_id", "flowId"),
    ("groupId holds a NUL", r'{"id":"m-1","newStatus":"DELIVERED","groupId":"g\u0000"}', "group_id", "groupId"),
    ("callbackData holds a NUL", r'{"id":"m-1","newStatus":"DELIVERED","callbackData":"a\u0000b"}',
     "callback_data", "callbackData"),
    ("callbackData holds a surrogate", r'{"id":"m-1","newStatus":"DELIVERED","callbackData":{"k":"\udc00"}}',
     "callback_data", "callbackData"),
]


@pytest.mark.parametrize("name, body, column, field", TOLERATED, ids=[t[0] for t in TOLERATED])
def test_an_unreadable_optional_field_is_stored_as_null_and_the_status_kept(
        client, callback_path, name, body, column, field):
    answer = client.post(callback_path, data=body, content_type="application/json")

    assert answer.status_code == 200, answer.json
    assert answer.json == {"stored": True, "duplicate": False, "unreadable": [field]}
    message = Message.get_by_id("m-1")
    assert message.status == json.loads(body)["newStatus"]
    assert getattr(message, column) is None
    assert Event.get().raw == body, "the raw copy keeps what came"
    assert Rejected.select().count() == 0


@pytest.mark.parametrize("price, stored", [("2,5", 2.5), ("0,35", 0.35), (" 1.75 ", 1.75), ("3", 3.0)])
def test_a_price_written_with_a_decimal_comma_is_read(client, callback_path, price, stored):
    answer = client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED", price=price))

    assert answer.status_code == 200 and answer.json == {"stored": True, "duplicate": False}
    assert Message.get_by_id("m-1").price == pytest.approx(stored)
    assert Event.get().price == pytest.approx(stored)


def test_a_form_with_unreadable_numbers_keeps_its_status(client, callback_path):
    answer = client.post(callback_path, data={"id": "m-9", "newStatus": "DELIVERED", "newStatusCode": "--5",
                                              "partCount": "²", "price": "2,5"})

    assert answer.status_code == 200 and answer.json["unreadable"] == ["newStatusCode", "partCount"]
    message = Message.get_by_id("m-9")
    assert (message.status, message.status_code, message.part_count, message.price) == ("DELIVERED", None, None, 2.5)


@pytest.mark.parametrize("sent, stored", [(12345, "12345"), (0, "0"), (-7, "-7")])
def test_a_numeric_id_is_kept_as_its_text(client, callback_path, sent, stored):
    answer = client.post(callback_path, json=callback_body(id=sent))

    assert answer.status_code == 200
    assert Message.get_by_id(stored).status == "PENDING"
    assert Event.get().message_id == stored


@pytest.mark.parametrize("code, status, stage", [(6, "DELIVERED", "chat_id"), (2, "PENDING", "none")])
def test_a_status_is_read_from_a_confirmed_code_when_absent(client, callback_path, code, status, stage):
    body = {"id": "m-1", "oldStatusCode": 2, "newStatusCode": code, "callbackData": "коды"}
    if code == 2:
        body["oldStatusCode"] = None

    answer = client.post(callback_path, json=body)

    assert answer.status_code == 200 and answer.json == {"stored": True, "duplicate": False}
    message = Message.get_by_id("m-1")
    assert (message.status, message.status_code, message.stage) == (status, code, stage)
    event = Event.get()
    assert (event.old_status, event.new_status) == ("PENDING" if code == 6 else None, status)


def test_a_status_given_wins_over_its_code(client, callback_path):
    """Codes other than 2 and 6 are not confirmed: the status as given is kept, with the code as received."""
    client.post(callback_path, json={"id": "m-1", "newStatus": "UNDELIVERED", "newStatusCode": 6})

    assert (Message.get_by_id("m-1").status, Message.get_by_id("m-1").status_code) == ("UNDELIVERED", 6)


def test_an_unreadable_status_with_a_confirmed_code_is_read_from_the_code(client, callback_path):
    answer = client.post(callback_path, json={"id": "m-1", "newStatus": {"x": 1}, "newStatusCode": 6})

    assert answer.status_code == 200 and answer.json["unreadable"] == ["newStatus"]
    assert Message.get_by_id("m-1").status == "DELIVERED"


def test_an_array_of_callbacks_is_stored_item_by_item(client, callback_path):
    items = [callback_body("m-1", old="PENDING", new="DELIVERED"), callback_body("m-2", old="CREATED", new="PENDING")]

    answer = client.post(callback_path, json=items)

    assert answer.status_code == 200
    assert answer.json == {"counts": {"stored": 2, "duplicate": 0, "refused": 0},
                           "items": [{"stored": True, "duplicate": False}, {"stored": True, "duplicate": False}]}
    assert {m.id: m.status for m in Message.select()} == {"m-1": "DELIVERED", "m-2": "PENDING"}
    assert [json.loads(e.raw) for e in Event.select().order_by(Event.id)] == items, "each event keeps its item"


def test_an_array_item_that_names_no_message_is_kept_and_the_others_stored(client, callback_path):
    good = callback_body("m-1", old="PENDING", new="DELIVERED")
    nameless = {"newStatus": "DELIVERED", "callbackData": "без id"}

    answer = client.post(callback_path, json=[good, nameless, good, "DELIVERED"])

    assert answer.status_code == 200
    assert answer.json["counts"] == {"stored": 1, "duplicate": 1, "refused": 2}
    assert answer.json["items"][1] == {"error": "missing_field", "detail": "item 1: 'id' is required"}
    assert answer.json["items"][3]["error"] == "not_an_object"
    kept = list(Rejected.select().order_by(Rejected.id))
    assert [(k.reason, json.loads(bytes(k.body))) for k in kept] == [("missing_field", nameless),
                                                                      ("not_an_object", "DELIVERED")]
    assert Message.get_by_id("m-1").status == "DELIVERED" and Event.select().count() == 1


def test_an_array_of_nothing_storable_is_refused_and_each_item_kept(client, callback_path):
    answer = client.post(callback_path, json=[{"newStatus": "PENDING"}, {"id": "m-1"}])

    assert answer.status_code == 422
    assert answer.json["error"] == "missing_field" and answer.json["detail"].startswith("none of the 2")
    assert answer.json["counts"] == {"stored": 0, "duplicate": 0, "refused": 2}
    assert [k.reason for k in Rejected.select()] == ["missing_field", "missing_field"]
    assert Message.select().count() == 0 and Event.select().count() == 0


def test_an_array_longer_than_the_limit_is_refused_whole(client, callback_path):
    items = [{"id": f"m{n}", "newStatusCode": 6} for n in range(callbacks.MAX_ITEMS + 1)]

    answer = client.post(callback_path, json=items)

    assert answer.status_code == 413 and answer.json["error"] == "too_many_items"
    assert Message.select().count() == 0 and Rejected.get().reason == "too_many_items"


def test_twin_example_callback_is_stored_as_its_own_array_too(client, callback_path):
    example = json.loads(EXAMPLES.joinpath("status-callback.json").read_text(encoding="utf-8"))

    answer = client.post(callback_path, json=[example])

    assert answer.status_code == 200 and answer.json["counts"]["stored"] == 1
    message = Message.get_by_id(example["id"])
    assert (message.status, message.price, message.callback_data) == ("DELIVERED", 2.5, "123")


def test_a_refused_body_is_capped_but_its_size_kept(app, client, callback_path):
    cap = app.config["SETTINGS"].rejected_body_cap
    body = "[" + "1," * 20_000 + "1]"

    client.post(callback_path, data=body, content_type="application/json")

    kept = Rejected.get()
    assert kept.reason == "too_many_items"
    assert len(bytes(kept.body)) == cap and kept.body_truncated
    assert kept.content_length == len(body)


def test_wrong_method_is_405_and_kept(client, callback_path):
    answer = client.get(callback_path)

    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"
    assert Rejected.get().reason == "method_not_allowed"


def test_wrong_method_with_an_oversized_body_is_still_a_405_with_a_reason(client, callback_path):
    answer = client.put(callback_path, data=b"x" * 70_000, content_type="application/json")

    assert answer.status_code == 405 and answer.json["error"] == "method_not_allowed"
    kept = Rejected.get()
    assert kept.reason == "method_not_allowed" and bytes(kept.body) == b""


def test_options_is_a_wrong_method_like_the_others(client, callback_path):
    answer = client.options(callback_path)

    assert answer.status_code == 405 and answer.json["error"] == "method_not_allowed"
    assert answer.headers["Allow"] == "POST"
    assert (Rejected.get().reason, Rejected.get().method) == ("method_not_allowed", "OPTIONS")


def test_a_form_with_more_parts_than_the_parser_takes_is_refused_and_kept(settings, client, callback_path):
    part = '--b\r\nContent-Disposition: form-data; name="{}"\r\n\r\n{}\r\n'
    body = (part.format("id", "m-1") + part.format("newStatus", "PENDING") + part.format("x", "1") * 1000
            + "--b--\r\n").encode()
    assert len(body) < settings.max_body_bytes

    answer = client.post(callback_path, data=body, content_type="multipart/form-data; boundary=b")

    assert answer.status_code == 413
    assert answer.json["error"] == "too_many_fields" and answer.json["detail"]
    kept = Rejected.get()
    assert (kept.reason, kept.content_length) == ("too_many_fields", len(body))
    assert Message.select().count() == 0 and Event.select().count() == 0


def test_a_long_content_type_or_client_address_is_cut_to_its_column(client, callback_path):
    content_type = "application/json; note=" + "x" * 300
    address = "2001:db8::" + "1" * 100          # whatever a trusted proxy's X-Forwarded-For said
    sent = dict(content_type=content_type, environ_base={"REMOTE_ADDR": address})

    stored = client.post(callback_path, data=json.dumps(callback_body()), **sent)
    refused = client.post(callback_path, data="{nope", **sent)

    assert stored.status_code == 200 and refused.status_code == 400
    event, kept = Event.get(), Rejected.get()
    assert (event.content_type, event.remote_addr) == (content_type[:128], address[:64])
    assert (kept.content_type, kept.remote_addr) == (content_type[:128], address[:64])


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
def test_a_method_the_route_does_not_list_is_refused_like_get(client, callback_path, method):
    answer = client.open(callback_path, method=method, json=callback_body())

    assert answer.status_code == 405 and answer.headers["Allow"] == "POST"
    assert answer.json == {"error": "method_not_allowed", "detail": f"use POST, not {method}"}
    assert Rejected.get().reason == "method_not_allowed" and Event.select().count() == 0

    wrong = client.open("/callbacks/" + "x" * len(CALLBACK_TOKEN), method=method, json=callback_body())
    assert wrong.status_code == 404 and wrong.json == {"error": "not_found"}
    assert Rejected.select().count() == 1


@pytest.mark.parametrize("method", ["post", "get", "options"])
def test_a_wrong_token_is_404_and_stores_nothing(client, method):
    answer = getattr(client, method)("/callbacks/" + "x" * len(CALLBACK_TOKEN), json=callback_body())

    assert answer.status_code == 404
    assert Event.select().count() == 0 and Rejected.select().count() == 0 and Message.select().count() == 0


def test_the_results_view_reads_like_the_recipe_table_from_the_sqlite_file(settings, client, callback_path):
    if not settings.is_sqlite:
        pytest.skip("reads the SQLite file itself")
    client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED", callbackData="Опрос"))

    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        cursor = connection.execute("select * from results")
        columns = [c[0] for c in cursor.description]
        rows = cursor.fetchall()

    assert columns[:6] == ["message_id", "callback_data", "phone", "status", "chat_id", "result"]
    assert rows[0][:6] == ("m-1", "Опрос", None, "DELIVERED", None, None)


def test_reading_a_mailing_by_callback_data_uses_an_index_in_the_sqlite_file(settings, client, callback_path):
    if not settings.is_sqlite:
        pytest.skip("asks SQLite for its query plan")
    client.post(callback_path, json=callback_body(callbackData="Опрос"))

    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        plan = connection.execute("explain query plan select * from results where callback_data = ?",
                                  ["Опрос"]).fetchall()
    assert any("USING INDEX" in row[-1] and "callback_data" in row[-1] for row in plan), plan


def test_concurrent_callbacks_from_many_threads_are_all_stored(live_app):
    url = f"{live_app.url}/callbacks/{CALLBACK_TOKEN}"
    failures = []

    def post_many(thread_number):
        with requests.Session() as session:
            for n in range(40):
                body = callback_body(message_id=f"t{thread_number}-{n}", old="PENDING", new="DELIVERED")
                answer = session.post(url, json=body, timeout=30)
                if answer.status_code != 200:
                    failures.append((answer.status_code, answer.text))
                session.post(url, json=body, timeout=30)          # and a duplicate

    threads = [threading.Thread(target=post_many, args=(t,)) for t in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert Event.select().count() == 12 * 40
    assert Message.select().where(Message.status == "DELIVERED").count() == 12 * 40


def test_healthz_checks_the_database(client):
    answer = client.get("/healthz")

    assert answer.status_code == 200 and answer.json["database"] == "ok"


def test_healthz_is_503_when_the_schema_is_gone(client):
    Fact.drop_table()

    answer = client.get("/healthz")

    assert answer.status_code == 503
    assert answer.json["status"] == "unavailable" and answer.json["database"] not in ("", "ok")
