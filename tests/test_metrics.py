"""/metrics: Prometheus text, counters from every process, gauges read from the database (cached for
METRICS_CACHE_SECONDS), open unless METRICS_TOKEN is set."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from peewee import OperationalError
from prometheus_client.parser import text_string_to_metric_families

from receiver import create_app, health, metrics
from receiver.db import db, utcnow
from receiver.models import Message, TwinCall

from .support import API_TOKEN, CALLBACK_PATH, CALLBACK_TOKEN, make_settings, scrape, seed, value

ROOT = Path(__file__).resolve().parents[1]
METRICS_TOKEN = "test-metrics-token-0123456789abc"


@pytest.fixture
def make_client(database_url):
    """make_client(**settings) -> a test client of an app with these settings."""
    def make(**overrides):
        return create_app(make_settings(database_url, **overrides)).test_client()
    yield make
    if not db.is_closed():
        db.close()


def test_metrics_are_open_and_count_what_happened(client):
    before = scrape(client)
    seed(client, 3)
    seed(client, 1, prefix="p", status="PENDING")
    seed(client, 1, callback_data="mailing-1")                      # an exact repeat
    assert client.post(CALLBACK_PATH, data="{nope", content_type="application/json").status_code == 400
    Message.update(next_check_at=utcnow() - dt.timedelta(seconds=90)).where(Message.id == "m00000").execute()
    Message.update(next_check_at=utcnow() + dt.timedelta(hours=1)).where(Message.id != "m00000").execute()
    health.count_twin_call("messages_stats", "ok")
    TwinCall.insert(endpoint="sessions_stats", last_error="HTTP 502", last_error_at=dt.datetime(2025, 1, 2),
                    last_ok_at=dt.datetime(2025, 1, 1)).execute()

    answer = client.get("/metrics")
    assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("receiver_callbacks_total", status="DELIVERED") == 3
    assert delta("receiver_callbacks_total", status="PENDING") == 1
    assert delta("receiver_callbacks_total", status="duplicate") == 1
    assert delta("receiver_rejected_total", reason="unparsable_json") == 1
    assert delta("receiver_twin_calls_total", endpoint="messages_stats", outcome="ok") == 1
    assert value(after, "receiver_database_up") == 1
    assert value(after, "receiver_messages", stage="chat_id") == 3
    assert value(after, "receiver_messages", stage="none") == 1
    assert value(after, "receiver_messages", stage="given_up") == 0
    assert value(after, "receiver_enrichment_due") == 1
    assert 89 <= value(after, "receiver_enrichment_oldest_due_seconds") < 150
    assert value(after, "receiver_events_stored") == 4
    assert value(after, "receiver_rejected_stored") == 1
    assert value(after, "receiver_twin_last_error_timestamp_seconds", endpoint="sessions_stats") == \
        dt.datetime(2025, 1, 2, tzinfo=dt.UTC).timestamp()
    assert value(after, "receiver_twin_last_ok_timestamp_seconds", endpoint="sessions_stats") == \
        dt.datetime(2025, 1, 1, tzinfo=dt.UTC).timestamp()


def test_statuses_outside_the_known_set_count_as_other(client):
    before = scrape(client)
    for n, status in enumerate(["MADE_UP_1", "made up 2", "DELIVERED"]):
        assert client.post(CALLBACK_PATH, json={"id": f"x{n}", "newStatus": status}).status_code == 200

    after = scrape(client)

    assert value(after, "receiver_callbacks_total", status="other") - \
        value(before, "receiver_callbacks_total", status="other") == 2
    assert value(after, "receiver_callbacks_total", status="DELIVERED") - \
        value(before, "receiver_callbacks_total", status="DELIVERED") == 1
    labels = {dict(sample_labels).get("status") for _, sample_labels in after}
    assert not labels & {"MADE_UP_1", "MADE UP 2"}, "a sender's made-up status must not become a label"


def test_openmetrics_when_asked(client):
    answer = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
    assert answer.get_data(as_text=True).rstrip().endswith("# EOF")


def test_a_database_that_does_not_answer_is_a_gauge_not_a_500(client, monkeypatch):
    def fail(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(health, "due_now", fail)
    samples = scrape(client)
    assert value(samples, "receiver_database_up") == 0
    assert ("receiver_messages", (("stage", "none"),)) not in samples
    assert metrics.CALLBACKS._name == "receiver_callbacks"      # the counters are still there


WORKER = textwrap.dedent("""
    import sys
    from receiver import create_app
    client = create_app().test_client()
    for message_id in sys.argv[1:]:
        assert client.post("/callbacks/{token}", json={{"id": message_id, "newStatus": "DELIVERED"}}).status_code == 200
""")
SCRAPER = textwrap.dedent("""
    from receiver import create_app
    print(create_app().test_client().get("/metrics").get_data(as_text=True))
""")


def test_counters_add_up_across_worker_processes(tmp_path):
    """As under gunicorn: each process counts in PROMETHEUS_MULTIPROC_DIR; any one of them reports all."""
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "PYTHONPATH": str(ROOT),
           "DATABASE_URL": f"sqlite:///{tmp_path}/receiver.db", "API_TOKEN": API_TOKEN,
           "CALLBACK_TOKEN": CALLBACK_TOKEN}
    worker = WORKER.format(token=CALLBACK_TOKEN)
    workers = [subprocess.Popen([sys.executable, "-c", worker, *ids], env=env, cwd=tmp_path)
               for ids in (["a1", "a2"], ["b1", "b2", "b3"])]
    assert [w.wait(timeout=60) for w in workers] == [0, 0]
    text = subprocess.run([sys.executable, "-c", SCRAPER], env=env, cwd=tmp_path, check=True,
                          capture_output=True, text=True, timeout=60).stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert value(samples, "receiver_callbacks_total", status="DELIVERED") == 5
    assert value(samples, "receiver_messages", stage="chat_id") == 5
    assert value(samples, "receiver_events_stored") == 5


def test_the_database_gauges_are_read_again_only_when_the_cache_expires(make_client):
    client = make_client(metrics_cache_seconds=1.0)
    seed(client, 2)
    first = scrape(client)
    seed(client, 1, start=2)

    cached = scrape(client)
    time.sleep(1.1)
    fresh = scrape(client)

    assert value(first, "receiver_events_stored") == value(cached, "receiver_events_stored") == 2
    assert value(fresh, "receiver_events_stored") == 3
    # The counters are this process's own, never cached.
    assert value(cached, "receiver_callbacks_total", status="DELIVERED") - \
        value(first, "receiver_callbacks_total", status="DELIVERED") == 1


def test_metrics_token_is_required_when_set(make_client):
    client = make_client(metrics_token=METRICS_TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcd"},
                    {"Authorization": f"Bearer {API_TOKEN}"}):
        answer = client.get("/metrics", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "receiver_" not in answer.get_data(as_text=True)
    assert value(scrape(client, Authorization=f"Bearer {METRICS_TOKEN}"), "receiver_database_up") == 1


def test_large_postgresql_tables_are_counted_from_their_statistics(settings, client, monkeypatch):
    if settings.is_sqlite:
        pytest.skip("PostgreSQL's statistics")
    seed(client, 3)
    db.execute_sql("ANALYZE event")
    seed(client, 2, start=3)                        # not in the statistics yet
    assert value(scrape(client), "receiver_events_stored") == 5

    monkeypatch.setattr("receiver.db.ESTIMATE_ABOVE", 1)    # as if 3 rows were past the threshold
    assert value(scrape(client), "receiver_events_stored") == 3
