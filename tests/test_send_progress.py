"""GET /api/sends/<id> answers a page of rows at a time (the counts always of every row), so that a
send of 20,000 destinations is not one answer of 20,000 rows."""
from __future__ import annotations

import pytest

from receiver.models import Outbox

from .support import SEND_TOKEN

SEND_AUTH = {"Authorization": f"Bearer {SEND_TOKEN}"}


@pytest.fixture
def client(sends_client):
    """An app that takes sends (TWIN credentials set; no request here calls TWIN)."""
    return sends_client


def send(client, count: int) -> dict:
    answer = client.post("/api/sends", headers=SEND_AUTH, json={
        "chat": {"chatId": "chat-1", "botId": "bot-1", "text": "Hello"}, "callbackData": "paged",
        "destinations": [{"phone": f"7999{n:07d}"} for n in range(count)]})
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()


def pages(client, url: str, **query) -> list[dict]:
    found, cursor = [], None
    while True:
        answer = client.get(url, headers=SEND_AUTH, query_string={**query, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.get_json()
        found.append(answer.get_json())
        cursor = found[-1]["nextCursor"]
        if cursor is None:
            return found


def test_a_large_send_is_read_a_thousand_rows_at_a_time_with_whole_counts(client):
    accepted = send(client, 1500)
    assert len(accepted["rows"]) == 1000 and accepted["nextCursor"] is not None
    assert accepted["counts"]["pending"] == 1500

    read = pages(client, accepted["url"])
    assert [len(page["rows"]) for page in read] == [1000, 500]
    assert all(page["counts"]["pending"] == 1500 and not page["complete"] for page in read)
    assert [row["index"] for page in read for row in page["rows"]] == list(range(1500))


def test_limit_and_cursor_walk_every_row_once_in_the_order_recorded(client):
    url = send(client, 5)["url"]
    Outbox.update(state="sent", message_id="id-x").execute()

    read = pages(client, url, limit=2)
    assert [[row["phone"] for row in page["rows"]] for page in read] == [
        ["79990000000", "79990000001"], ["79990000002", "79990000003"], ["79990000004"]]
    assert all(page["counts"]["sent"] == 5 and page["complete"] for page in read)


@pytest.mark.parametrize("query, parameter", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=two", "limit"),
    ("cursor=abc", "cursor"), ("cursor=-1", "cursor"), ("page=2", "page"),
])
def test_a_bad_limit_cursor_or_parameter_is_a_400(client, query, parameter):
    url = send(client, 1)["url"]
    answer = client.get(f"{url}?{query}", headers=SEND_AUTH)
    assert answer.status_code == 400
    assert answer.get_json()["parameter"] == parameter
