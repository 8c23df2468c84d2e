"""The `rejected` table put to use: refused callbacks listed by reason, and replayed once their cause is
fixed, through the endpoint's own reader and store (callbacks.accept), so a replay stores exactly what
the endpoint would store now. Replays are idempotent: what is already stored comes back as a duplicate
(the event's transition key). A replayed row is kept, marked with when and what came of it.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from peewee import Case, fn

from . import callbacks
from .db import db, utcnow
from .models import Rejected

# A replay that stored everything in the row (new or already there) resolves it.
RESOLVED = ("stored", "duplicate")
SHOWN_BODY_BYTES = 80


@dataclass(frozen=True)
class ReasonCount:
    reason: str
    kept: int
    unresolved: int
    first: dt.datetime
    last: dt.datetime


def by_reason() -> list[ReasonCount]:
    """Kept refusals per reason, most first, with how many no replay has resolved yet."""
    unresolved = fn.SUM(Case(None, [(Rejected.replay_outcome.in_(RESOLVED), 0)], 1))
    query = (Rejected
             .select(Rejected.reason, fn.COUNT(Rejected.id), unresolved,
                     fn.MIN(Rejected.received_at), fn.MAX(Rejected.received_at))
             .group_by(Rejected.reason)
             .order_by(fn.COUNT(Rejected.id).desc(), Rejected.reason))
    return [ReasonCount(reason, kept, int(open_ or 0), _naive(first), _naive(last))
            for reason, kept, open_, first, last in query.tuples()]


def select(*, row_id: int | None = None, reason: str | None = None, since: dt.datetime | None = None,
           until: dt.datetime | None = None):
    """Kept refusals in the order received: one by id, or those of a reason and/or time range
    (`since` inclusive, `until` exclusive, naive UTC)."""
    query = Rejected.select().order_by(Rejected.id)
    if row_id is not None:
        query = query.where(Rejected.id == row_id)
    if reason is not None:
        query = query.where(Rejected.reason == reason)
    if since is not None:
        query = query.where(Rejected.received_at >= since)
    if until is not None:
        query = query.where(Rejected.received_at < until)
    return query


def body_preview(row: Rejected) -> str:
    """The first bytes of a kept body, readable on one line (control characters escaped)."""
    body = bytes(row.body or b"")
    text = body[:SHOWN_BODY_BYTES].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text + ("..." if len(body) > SHOWN_BODY_BYTES or row.body_truncated else "")


@dataclass
class Replay:
    """What a replay of one kept refusal came to."""
    row_id: int
    reason: str
    not_replayable: str | None = None          # why it cannot be replayed
    refusal: callbacks.Refusal | None = None   # the body as a whole is still refused
    outcomes: list[callbacks.Outcome] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """What the row records: stored / duplicate / refused: <reason> / partial: N refused."""
        if self.refusal:
            return f"refused: {self.refusal.reason}"
        kinds = [outcome.kind for outcome in self.outcomes]
        if "refused" in kinds:
            if len(set(kinds)) == 1:
                return f"refused: {self.outcomes[0].refusal.reason}"
            return f"partial: {kinds.count('refused')} refused"
        return "stored" if "stored" in kinds else "duplicate"


def why_not_replayable(row: Rejected) -> str | None:
    if row.method != "POST":
        return f"a {row.method} request carries no callback"
    if row.reason == "payload_too_large":
        return "the body was larger than MAX_BODY_BYTES and was not kept"
    if row.body_truncated:
        return "only the first REJECTED_BODY_CAP bytes of the body were kept"
    if not row.body:
        return "no body was kept"
    return None


def replay(row: Rejected) -> Replay:
    """Replay one kept refusal through the endpoint's reader and store, and mark the row. Raises
    callbacks.Unstored when the database cannot store it (the row is then left as it was)."""
    result = Replay(row.id, row.reason, not_replayable=why_not_replayable(row))
    if result.not_replayable:
        return result
    try:
        result.outcomes = callbacks.accept(bytes(row.body), row.content_type, row.remote_addr).outcomes
    except callbacks.Refusal as refusal:
        result.refusal = refusal
    with db.atomic():
        Rejected.update(replayed_at=utcnow(), replay_outcome=result.outcome).where(Rejected.id == row.id).execute()
    return result


def replay_ids(query) -> list[int]:
    """The ids to replay, read first: each row is then read and replayed on its own."""
    return [row_id for (row_id,) in query.select(Rejected.id).tuples()]


def _naive(value):
    """SQLite hands MIN/MAX of a datetime column back as text."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value
