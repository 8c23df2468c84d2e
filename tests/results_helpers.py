"""Seeding helpers for the results tests: messages arrive through the real callback endpoint;
chat_id/result are set directly where enrichment is not what is under test."""
from __future__ import annotations

import datetime as dt
import json

from receiver.db import utcnow
from receiver.models import STAGE_DONE, Message

from .conftest import CALLBACK_TOKEN

CALLBACK_PATH = f"/callbacks/{CALLBACK_TOKEN}"


def callback(client, message_id: str, status: str = "DELIVERED", callback_data: str | None = "mailing-1",
             bulk_id: str | None = "bulk-1", old_status: str | None = None) -> None:
    body = {"id": message_id, "newStatus": status, "oldStatus": old_status, "bulkId": bulk_id}
    if callback_data is not None:
        body["callbackData"] = callback_data
    answer = client.post(CALLBACK_PATH, json=body)
    assert answer.status_code == 200, answer.get_json()


def seed(client, count: int, prefix: str = "m", start: int = 0, **kwargs) -> list[str]:
    """`count` messages through the callback endpoint; their ids, in arrival order."""
    ids = [f"{prefix}{n:05d}" for n in range(start, start + count)]
    for message_id in ids:
        callback(client, message_id, **kwargs)
    return ids


def answer(message_id: str, result, chat_id: str | None = None) -> None:
    """What enrichment would store for a message whose bot answered `result`."""
    Message.update(chat_id=chat_id or f"chat-{message_id}", chat_id_at=utcnow(), stage=STAGE_DONE,
                   result=result if isinstance(result, str) else json.dumps(result, ensure_ascii=False),
                   result_at=utcnow()).where(Message.id == message_id).execute()


def bulk_messages(count: int, prefix: str = "bulk", first_seen_at: dt.datetime | None = None,
                  callback_data: str = "big", result=None, same_time: bool = False) -> list[str]:
    """Many rows at once, straight into the table (for volume tests, where callbacks would be slow)."""
    base = first_seen_at or dt.datetime(2025, 1, 1)
    text = None if result is None else json.dumps(result, ensure_ascii=False)
    ids = [f"{prefix}{n:06d}" for n in range(count)]
    rows = [{"id": message_id, "callback_data": callback_data, "status": "DELIVERED", "status_rank": 4,
             "first_seen_at": base if same_time else base + dt.timedelta(milliseconds=n),
             "last_seen_at": base, "stage": STAGE_DONE if text else "none", "result": text}
            for n, message_id in enumerate(ids)]
    for start in range(0, len(rows), 500):
        Message.insert_many(rows[start:start + 500]).execute()
    return ids
