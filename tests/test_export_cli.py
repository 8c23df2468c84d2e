"""`flask export`: CSV / JSON / JSON lines, filters, files or stdout, streamed in keyset chunks."""
from __future__ import annotations

import csv
import io
import json

import pytest

from receiver import results
from receiver.db import db

from .support import answer, bulk_messages, seed


def run(app, *args):
    return app.test_cli_runner().invoke(args=["export", *args], catch_exceptions=False)


def test_csv_to_a_file_with_filters(app, client, tmp_path):
    ids = seed(client, 3, callback_data="Опрос, март")
    seed(client, 2, prefix="x", callback_data="other")
    answer(ids[0], {"confirmation": "Отказ", "nps": 7})
    target = tmp_path / "out.csv"
    outcome = run(app, "--callback-data", "Опрос, март", "-o", str(target))
    assert outcome.exit_code == 0, outcome.output
    assert not (tmp_path / "out.csv.part").exists()
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"), newline="")))
    assert [row["message_id"] for row in rows] == ids
    assert rows[0]["result.confirmation"] == "Отказ" and rows[0]["result.nps"] == "7"
    assert rows[0]["callback_data"] == "Опрос, март"


def test_json_and_jsonl_to_stdout(app, client):
    ids = seed(client, 2)
    seed(client, 1, prefix="p", status="PENDING")
    answer(ids[1], {"confirmation": "Да"})
    outcome = run(app, "--format", "json", "--status", "DELIVERED")
    assert outcome.exit_code == 0, outcome.output
    document = json.loads(outcome.stdout)
    assert [row["message_id"] for row in document] == ids
    assert document[1]["result"] == {"confirmation": "Да"}

    lines = run(app, "--format", "jsonl", "--stage", "done").stdout.splitlines()
    assert [json.loads(line)["message_id"] for line in lines] == [ids[1]]
    assert json.loads(run(app, "--format", "json", "--callback-data", "nobody").stdout) == []


def test_excel_flag_and_bad_filters(app, client):
    seed(client, 1)
    assert run(app, "--excel").stdout_bytes.startswith("\ufeff".encode())
    bad = app.test_cli_runner().invoke(args=["export", "--stage", "finished"])
    assert bad.exit_code == 2 and "--stage" in bad.output
    bad = app.test_cli_runner().invoke(args=["export", "--since", "2025-02-01", "--until", "2025-01-01"])
    assert bad.exit_code == 2 and "--until" in bad.output


def test_a_date_time_out_of_range_names_the_option(app):
    bad = app.test_cli_runner().invoke(args=["export", "--since", "0001-01-01T00:00+01:00"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    error_lines = [line for line in bad.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "--since" in error_lines[0]


@pytest.fixture
def count_selects(monkeypatch):
    """The row-limits of the SELECTs run on the database while the fixture is active."""
    limits = []
    database = db.obj
    original = database.execute_sql

    def counting(sql, params=None, *args, **kwargs):
        if sql.lstrip().upper().startswith("SELECT") and " LIMIT " in sql.upper():
            limits.append(params[-1] if params else None)
        return original(sql, params, *args, **kwargs)

    monkeypatch.setattr(database, "execute_sql", counting)
    return limits


def test_twenty_thousand_rows_stream_in_chunks(app, tmp_path, count_selects):
    bulk_messages(20_000, result={"confirmation": "Да", "nps": 9})
    target = tmp_path / "big.csv"
    outcome = run(app, "-o", str(target))
    assert outcome.exit_code == 0, outcome.output
    with target.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        count = sum(1 for _ in reader)
        assert reader.fieldnames[-2:] == ["result.confirmation", "result.nps"]
    assert count == 20_000
    assert "exporting 20000 rows" in outcome.stderr and f"wrote 20000 rows to {target}" in outcome.stderr
    # Read in keyset chunks, never all at once: each chunk's end is looked up first (LIMIT 1 OFFSET
    # CHUNK - 1), and the chunk read up to it.
    chunked = [limit for limit in count_selects if limit is not None]
    assert len(chunked) >= 20_000 // results.CHUNK
    assert max(chunked) <= results.CHUNK + 1
