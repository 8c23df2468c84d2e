"""The tables: the schema and its upgrades, and the callback_data index."""
from __future__ import annotations

import hashlib

import pytest

from receiver import models, results
from receiver.db import db
from receiver.models import Event, Message

from .support import callback_body

pytestmark = pytest.mark.timeout(60)

# What schema 1 had where schema 2 differs, written over a schema-2 database that holds callbacks.
SCHEMA_1 = [
    "DROP INDEX event_transition",
    "ALTER TABLE event ADD COLUMN dedup_key TEXT",
    "UPDATE event SET dedup_key = message_id || '|' || COALESCE(old_status, '') || '|' || new_status",
    "CREATE UNIQUE INDEX event_dedup_key ON event (dedup_key)",
    "CREATE INDEX event_message_id ON event (message_id)",
    "CREATE INDEX event_received_at ON event (received_at)",
    "DROP INDEX message_send_id",
    "CREATE INDEX message_send_id ON message (send_id)",
    "DROP INDEX message_chat_id",
    "CREATE INDEX message_chat_id ON message (chat_id)",
    "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
]


def event_rows():
    return [(e.message_id, e.old_status, e.new_status, e.raw) for e in Event.select().order_by(Event.id)]


def index_sql(table):
    return {index.name: index.sql for index in db.get_indexes(table) if not index.name.endswith("pkey")}


def test_a_schema_1_database_comes_up_current_with_its_events_still_deduplicated(app, client, callback_path):
    for old, new in ((None, "PENDING"), ("PENDING", "DELIVERED")):
        assert client.post(callback_path, json=callback_body(old=old, new=new)).status_code == 200
    with db.connection_context():
        for statement in SCHEMA_1:
            db.execute_sql(statement)
        before = event_rows()

    models.create_schema()
    models.create_schema()                      # and again: a second start changes nothing

    with db.connection_context():
        assert "dedup_key" not in {column.name for column in db.get_columns("event")}
        assert event_rows() == before
        assert set(index_sql("event")) == {"event_transition"}
        assert all("WHERE" in index_sql("message")[name].upper() for name in ("message_send_id", "message_chat_id"))
        assert models.Fact.get_by_id("schema_version").value == models.SCHEMA_VERSION == "3"
    repeat = client.post(callback_path, json=callback_body(old="PENDING", new="DELIVERED"))
    fresh = client.post(callback_path, json=callback_body("m-2", old=None, new="PENDING"))
    assert repeat.json == {"stored": True, "duplicate": True}
    assert fresh.json == {"stored": True, "duplicate": False}
    with db.connection_context():
        assert len(event_rows()) == 3


# Schema 2 indexed the whole callback_data, on PostgreSQL too, where a long one cannot be indexed.
SCHEMA_2 = ['DROP INDEX IF EXISTS "message_callback_data_prefix"',
            'CREATE INDEX IF NOT EXISTS "message_callback_data_first_seen_at_id" ON message (callback_data, first_seen_at, id)',
            "UPDATE meta SET value = '2' WHERE key = 'schema_version'"]
# 10,000 bytes of UTF-8 (TWIN takes 10,240) that do not compress: a PostgreSQL btree key holds about 2,700
# bytes once compressed.
LONG_CALLBACK_DATA = "Опрос " + "".join(hashlib.sha256(bytes([n])).hexdigest() for n in range(157))[:9_989]


def callback_data_indexes() -> set[str]:
    return {name for name in index_sql("message") if "callback_data" in name}


def test_a_schema_2_database_comes_up_current_and_takes_a_long_callback_data(app, settings, client, callback_path):
    with db.connection_context():
        for statement in SCHEMA_2:
            db.execute_sql(statement)

    models.create_schema()
    models.create_schema()                      # and again: a second start changes nothing

    with db.connection_context():
        expected = "message_callback_data_first_seen_at_id" if settings.is_sqlite else "message_callback_data_prefix"
        assert callback_data_indexes() == {expected}
        assert models.Fact.get_by_id("schema_version").value == models.SCHEMA_VERSION
    assert client.post(callback_path, json=callback_body(callbackData=LONG_CALLBACK_DATA)).status_code == 200


def test_a_long_callback_data_is_stored_whole_and_found_exactly(client, callback_path, api_headers):
    assert len(LONG_CALLBACK_DATA.encode()) == 10_000
    same_start = LONG_CALLBACK_DATA[:-5] + "иначе"       # differs only in its last characters
    for message_id, callback_data in (("m-1", LONG_CALLBACK_DATA), ("m-2", same_start), ("m-3", "short")):
        answer = client.post(callback_path, json=callback_body(message_id, callbackData=callback_data))
        assert answer.status_code == 200, answer.get_json()

    for path in ("/api/results", "/api/messages"):
        found = client.get(path, query_string={"callbackData": LONG_CALLBACK_DATA}, headers=api_headers).get_json()
        rows = found.get("results", found.get("messages"))
        assert [(row.get("message_id", row.get("id")), row["callback_data"]) for row in rows] == [
            ("m-1", LONG_CALLBACK_DATA)], path


def test_reading_a_mailing_by_callback_data_uses_its_index(app, settings):
    query = (results.Filters(callback_data=LONG_CALLBACK_DATA).where(models.Message.select())
             .order_by(models.Message.first_seen_at, models.Message.id).limit(100))
    sql, params = query.sql()
    with db.connection_context(), db.atomic():
        if not settings.is_sqlite:
            db.execute_sql("SET LOCAL enable_seqscan = off")   # an empty table is read whole otherwise
        explain = "EXPLAIN QUERY PLAN " if settings.is_sqlite else "EXPLAIN "
        plan = " ".join(str(row[-1]) for row in db.execute_sql(explain + sql, params))
    expected = "message_callback_data_first_seen_at_id" if settings.is_sqlite else "message_callback_data_prefix"
    assert expected in plan, plan


def test_an_event_without_an_old_status_is_stored_once(client, callback_path):
    first = client.post(callback_path, json=callback_body(old=None, new="PENDING"))
    again = client.post(callback_path, json=callback_body(old=None, new="PENDING"))

    assert (first.json["duplicate"], again.json["duplicate"]) == (False, True)
    with db.connection_context():
        assert Event.select().count() == 1 and Message.get_by_id("m-1").status == "PENDING"
