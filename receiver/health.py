"""The backlog and TWIN-call health: what the web side (/metrics, `status`) reads of the worker's work."""
from __future__ import annotations

import datetime as dt

from peewee import fn

from . import metrics
from .db import earliest, utcnow
from .models import ACTIVE_STAGES, STAGE_NONE, Message, TwinCall
from .twin24 import TwinError


def count_twin_call(endpoint: str, outcome: str) -> None:
    metrics.TWIN_CALLS.labels(endpoint=endpoint, outcome=outcome).inc()


def remember_twin_error(error: TwinError, now: dt.datetime) -> None:
    (TwinCall.insert(endpoint=error.endpoint, last_error=str(error)[:1000], last_error_at=now)
     .on_conflict(conflict_target=[TwinCall.endpoint],
                  update={TwinCall.last_error: str(error)[:1000], TwinCall.last_error_at: now})
     .execute())


def remember_twin_ok(endpoint: str, now: dt.datetime) -> None:
    (TwinCall.insert(endpoint=endpoint, last_ok_at=now)
     .on_conflict(conflict_target=[TwinCall.endpoint], update={TwinCall.last_ok_at: now})
     .execute())


def due_now(now: dt.datetime | None = None) -> dict:
    """How many messages are due for a TWIN lookup, and how overdue the oldest is (no count per stage:
    that is a GROUP BY over the whole table, which /metrics reads from the stored summaries instead)."""
    now = now or utcnow()
    due_filter = (Message.stage.in_(list(ACTIVE_STAGES) + [STAGE_NONE])) & (Message.next_check_at <= now)
    oldest = Message.select(earliest(Message.next_check_at)).where(due_filter).scalar()
    return {"due": Message.select().where(due_filter).count(),
            "oldest_due_seconds": (now - oldest).total_seconds() if oldest else None}


def backlog(now: dt.datetime | None = None) -> dict:
    """Messages per stage, how many are due, how overdue the oldest is, the last TWIN errors."""
    stages = dict(Message.select(Message.stage, fn.COUNT(Message.id)).group_by(Message.stage).tuples())
    errors = {row.endpoint: (row.last_error, row.last_error_at)
              for row in TwinCall.select().where(TwinCall.last_error.is_null(False))}
    return {"stages": stages, **due_now(now), "twin_errors": errors}
