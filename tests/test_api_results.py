"""GET /api/results, /api/results.csv and /api/results/summary: auth, pages, filters, CSV quoting."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest

from receiver.models import Message

from .support import API_TOKEN, answer, seed

ENDPOINTS = ("/api/results", "/api/results.csv", "/api/results.json", "/api/results/summary")
EXAMPLES = Path(__file__).resolve().parent / "examples"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_refusals(client, path):
    missing = client.get(path)
    assert missing.status_code == 401 and missing.get_json()["error"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get(path, headers={"Authorization": "Bearer " + API_TOKEN[:-1] + "x"})
    assert wrong.status_code == 401
    basic = client.get(path, headers={"Authorization": "Basic " + API_TOKEN})
    assert basic.status_code == 401
    for name in ("token", "api_token", "access_token"):
        # Even the right token is refused in a URL: it would end up in logs.
        in_query = client.get(f"{path}?{name}={API_TOKEN}", headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert in_query.status_code == 400 and in_query.get_json()["error"] == "token_in_query"


def test_pages_follow_the_cursor_with_no_row_twice_or_missing(client, api_headers):
    ids = seed(client, 12)
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = client.get("/api/results", query_string=query, headers=api_headers).get_json()
        assert page["limit"] == 5 and len(page["results"]) <= 5
        seen += [row["message_id"] for row in page["results"]]
        if pages == 0:
            seed(client, 3, prefix="late")          # arrives while the client is paging
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids + ["late00000", "late00001", "late00002"]
    assert pages == 3


@pytest.mark.parametrize("query, param", [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "ten"}, "limit"),
    ({"cursor": "bogus"}, "cursor"), ({"callback_data": "x"}, "callback_data"),
    ({"stage": "finished"}, "stage"), ({"since": "last week"}, "since"),
    # Valid ISO 8601, but moved to UTC they fall outside the years a datetime can hold.
    ({"since": "0001-01-01T00:00+01:00"}, "since"), ({"until": "9999-12-31T23:00-05:00"}, "until"),
])
def test_bad_parameters(client, api_headers, query, param):
    answer_ = client.get("/api/results", query_string=query, headers=api_headers)
    assert answer_.status_code == 400
    assert answer_.get_json()["parameter"] == param


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CRAFTED_CURSORS = {
    "garbage": "!!not a cursor!!",
    "non-ASCII": "курсор",
    "bytes that are not UTF-8": b64(b"\xff\xfe\x00"),
    "JSON nested past the recursion limit": b64("[" * 1500 + "]" * 1500),
    "longer than any cursor": b64("[" * 100_000),
    "an object": b64('{"a": 1, "b": 2}'),
    "a two-letter string": b64('"ab"'),
    "numbers": b64("[1, 2]"),
    "a number too long to read": b64("[" + "9" * 5000 + ", 1]"),
    "three parts": b64('["2025-01-01T00:00:00", "m", "x"]'),
    "an id that is an object": b64('["2025-01-01T00:00:00", {"a": [1]}]'),
    "a NUL in the id": b64('["2025-01-01T00:00:00", "m\\u0000"]'),          # PostgreSQL refuses NUL in text
    "an id longer than any message id": b64(json.dumps(["2025-01-01T00:00:00", "m" * 129])),
    "a time with an offset": b64('["2025-01-01T00:00:00+05:00", "m"]'),
    "not a time": b64('["yesterday", "m"]'),
}


@pytest.mark.parametrize("name", CRAFTED_CURSORS)
def test_a_crafted_cursor_is_a_400_with_a_reason(client, api_headers, name):
    seed(client, 2)
    answer_ = client.get("/api/results", query_string={"cursor": CRAFTED_CURSORS[name]}, headers=api_headers)
    assert answer_.status_code == 400, answer_.get_data(as_text=True)[:300]
    body = answer_.get_json()
    assert body["error"] == "bad_parameter" and body["parameter"] == "cursor" and body["detail"]


def test_a_cursor_given_out_still_works_beside_the_crafted_ones(client, api_headers):
    ids = seed(client, 3)
    first = client.get("/api/results?limit=2", headers=api_headers).get_json()
    rest = client.get("/api/results", query_string={"cursor": first["next_cursor"]}, headers=api_headers)
    assert [row["message_id"] for row in rest.get_json()["results"]] == ids[2:]


def test_filters_and_json_shape(client, api_headers):
    survey = seed(client, 3, callback_data="Опрос", bulk_id="b1")
    failed = seed(client, 2, prefix="f", callback_data="Опрос", bulk_id="b1", status="UNDELIVERED")
    seed(client, 2, prefix="o", callback_data="other", bulk_id="b2")
    answer(survey[0], {"confirmation": "Отказ", "nps": 7})

    def ids(**query):
        answer_ = client.get("/api/results", query_string=query, headers=api_headers)
        assert answer_.status_code == 200, answer_.get_json()
        return [row["message_id"] for row in answer_.get_json()["results"]]

    assert ids(callbackData="Опрос") == survey + failed
    assert ids(bulkId="b2") == ["o00000", "o00001"]
    assert ids(callbackData="Опрос", status="UNDELIVERED") == failed
    assert ids(status="undelivered,delivered", bulkId="b1") == survey + failed
    assert ids(stage="done") == [survey[0]]
    first_failed = Message.get_by_id(failed[0]).first_seen_at.isoformat()
    assert ids(since=first_failed, callbackData="Опрос") == failed
    assert ids(until=first_failed) == survey

    raw = client.get("/api/results", query_string={"stage": "done"}, headers=api_headers)
    assert "Отказ".encode() in raw.data                     # Cyrillic as UTF-8, not \u escapes
    row = raw.get_json()["results"][0]
    assert row["result"] == {"confirmation": "Отказ", "nps": 7}
    assert row["chat_id"] == f"chat-{survey[0]}" and row["status"] == "DELIVERED"


NASTY = 'Рассылка, "весна"\nвторая строка; =1+1'


def test_csv_quotes_cyrillic_commas_quotes_and_newlines(client, api_headers):
    ids = seed(client, 3, callback_data=NASTY)
    answer(ids[0], {"confirmation": "Отказ, но вежливо", "comment": 'сказал "нет"\r\nи ушёл', "nps": 7,
                    "nested": {"a": [1, "б"]}})
    answer(ids[1], {"confirmation": "Да"})
    response = client.get("/api/results.csv", query_string={"callbackData": NASTY}, headers=api_headers)
    assert response.status_code == 200
    assert response.is_streamed
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"] == 'attachment; filename="results.csv"'
    text = response.get_data().decode("utf-8")
    assert not text.startswith("\ufeff")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [row["message_id"] for row in rows] == ids
    assert {row["callback_data"] for row in rows} == {NASTY}
    first = rows[0]
    assert first["result.confirmation"] == "Отказ, но вежливо"
    assert first["result.comment"] == 'сказал "нет"\r\nи ушёл'
    assert first["result.nps"] == "7"
    assert json.loads(first["result.nested.a"]) == [1, "б"]          # nested objects flattened, lists as JSON
    assert json.loads(first["result"])["comment"] == 'сказал "нет"\r\nи ушёл'
    assert rows[1]["result.confirmation"] == "Да" and rows[1]["result.comment"] == ""
    assert rows[2]["result"] == "" and rows[2]["stage"] == "chat_id"
    assert list(rows[0])[-5:] == ["result", "result.confirmation", "result.comment", "result.nested.a",
                                  "result.nps"]


def test_csv_for_excel_has_a_bom_and_no_live_formulas(client, api_headers):
    ids = seed(client, 2, callback_data="=HYPERLINK(\"http://x\")")
    answer(ids[0], {"comment": "@SUM(A1)", "nps": -5})
    Message.update(phone="+79991234567").execute()
    text = client.get("/api/results.csv?excel=1", headers=api_headers).get_data().decode("utf-8")
    assert text.startswith("\ufeff")
    rows = list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline="")))
    assert rows[0]["callback_data"] == "'=HYPERLINK(\"http://x\")"
    assert rows[0]["result.comment"] == "'@SUM(A1)"
    assert rows[0]["result.nps"] == "-5"            # numbers stay numbers
    assert rows[0]["phone"] == "+79991234567"


def test_empty_csv_has_the_header(client, api_headers):
    text = client.get("/api/results.csv?callbackData=none", headers=api_headers).get_data(as_text=True)
    assert text.splitlines() == [
        "message_id,callback_data,bulk_id,phone,destination_index,status,status_code,stage,given_up_reason,"
        "chat_id,session_status,bot_status,first_seen_at,delivered_at,chat_id_at,result_at,last_seen_at,result"]


def test_csv_refuses_bad_filters(client, api_headers):
    answer_ = client.get("/api/results.csv?stage=nope", headers=api_headers)
    assert answer_.status_code == 400 and answer_.get_json()["parameter"] == "stage"


def test_json_export_is_every_row_in_one_array(client, api_headers):
    ids = seed(client, 7, callback_data="j")
    seed(client, 2, prefix="x", callback_data="other")
    answer(ids[0], {"nps": "9", "profile": {"city": "Тверь"}})
    answer(ids[1], "not JSON")
    download = client.get("/api/results.json?callbackData=j", headers=api_headers)
    assert download.status_code == 200 and download.mimetype == "application/json"
    assert download.headers["Content-Disposition"] == 'attachment; filename="results.json"'
    rows = json.loads(download.get_data(as_text=True))
    assert rows == client.get("/api/results?callbackData=j", headers=api_headers).get_json()["results"]
    assert [row["message_id"] for row in rows] == ids
    assert rows[0]["result"] == {"nps": "9", "profile": {"city": "Тверь"}} and rows[1]["result"] == "not JSON"
    assert rows[0]["first_seen_at"].endswith("Z") and rows[0]["delivered_at"].endswith("Z")


def test_summary(client, api_headers):
    ids = seed(client, 4, callback_data="s")
    seed(client, 1, prefix="u", callback_data="s", status="ERROR")
    seed(client, 1, prefix="e", callback_data="s", status="EXPIRED", old_status="PENDING")
    answer(ids[0], {"confirmation": "Да", "nps": "10", "choice": ["a", "b"]})
    answer(ids[1], {"confirmation": "Нет", "nps": 3, "choice": ["b"]})
    answer(ids[2], {})
    body = client.get("/api/results/summary?callbackData=s", headers=api_headers).get_json()
    assert body["funnel"] == {"sent": 6, "delivered": 4, "session_started": 3, "answered": 2, "failed": 2}
    assert body["statuses"] == {"DELIVERED": 4, "ERROR": 1, "EXPIRED": 1}
    assert body["answers"]["nps"] == [{"value": "3", "count": 1}, {"value": "10", "count": 1}]
    assert body["answers"]["choice"] == [{"value": "b", "count": 2}, {"value": "a", "count": 1}]
    assert body["keys"] == ["choice", "confirmation", "nps"]
    assert body["lists"] == ["choice"] and body["other"] == {}


def test_summary_cuts_free_text_to_the_most_common(client, api_headers):
    ids = seed(client, 15, callback_data="free")
    for n, message_id in enumerate(ids):
        answer(message_id, {"comment": "same" if n < 3 else f"text {n}"})
    body = client.get("/api/results/summary?callbackData=free", headers=api_headers).get_json()
    shown = body["answers"]["comment"]
    assert len(shown) == 12 and shown[0] == {"value": "same", "count": 3}
    assert body["other"] == {"comment": {"values": 1, "count": 1}}


def test_the_recipes_result_reads_well_everywhere(client, api_headers):
    recipe = json.loads((EXAMPLES / "sessions-statistics-answer.json").read_text())["items"][0]
    stored = recipe["dialogResultsFromBotJson"]                 # {"nps": "Тест", ..., "initialVariables": []}
    ids = seed(client, 2, callback_data="recipe")
    answer(ids[0], stored)
    answer(ids[1], {**stored, "nps": "7", "initialVariables": {"name": "Ivan"}})

    text = client.get("/api/results.csv?callbackData=recipe", headers=api_headers).get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [name for name in rows[0] if name.startswith("result.")] == [
        "result.confirmation", "result.nps", "result.initialVariables.name"]
    assert (rows[0]["result.nps"], rows[0]["result.confirmation"]) == ("Тест", "Отказ")
    assert json.loads(rows[0]["result"])["initialVariables"] == []
    assert rows[1]["result.initialVariables.name"] == "Ivan" and rows[0]["result.initialVariables.name"] == ""

    page = client.get("/api/results?callbackData=recipe", headers=api_headers).get_json()
    assert page["results"][0]["result"] == stored
    summary = client.get("/api/results/summary?callbackData=recipe", headers=api_headers).get_json()
    assert summary["funnel"]["answered"] == 2
    assert summary["answers"]["nps"] == [{"value": "7", "count": 1}, {"value": "Тест", "count": 1}]
    assert summary["answers"]["confirmation"] == [{"value": "Отказ", "count": 2}]
