"""Message statuses: their order, and the one rule for moving a message's status forward.

TWIN's callbacks arrive out of order and in duplicate, and the statistics may report a status
whose callback never came. Whatever the source, a message's current status only moves forward
by rank, so a late PENDING never overwrites DELIVERED. Statuses we have never seen are stored as
they are, ranked after the in-flight ones and before the final ones.
"""
from __future__ import annotations

import datetime as dt

from peewee import Case, fn

from .models import STAGE_CHAT_ID, STAGE_NONE, Message

DELIVERED = "DELIVERED"

RANKS = {
    "CREATED": 0,
    "PENDING": 1, "DELAYED": 1, "PAUSED": 1,   # still in flight
    "UNDELIVERED": 3, "ERROR": 3,             # failed for good
    DELIVERED: 4,                             # a delivered message cannot become undelivered
}
UNKNOWN_RANK = 2
# Below this rank a status may move sideways (PENDING -> DELAYED -> PENDING); from it on, only up.
FINAL_RANK = 3


def rank_of(status: str) -> int:
    return RANKS.get(status.upper(), UNKNOWN_RANK)


def is_final(status: str) -> bool:
    return rank_of(status) >= FINAL_RANK


def new_message_fields(status: str, code: int | None, now, settings) -> dict:
    """Column values for a message first learned of with this status."""
    fields = {
        "status": status, "status_code": code, "status_rank": rank_of(status), "status_at": now,
        "first_seen_at": now, "last_seen_at": now,
    }
    if status == DELIVERED:
        fields.update(delivered_at=now, stage=STAGE_CHAT_ID, next_check_at=_first_check_at(now, settings))
    elif rank_of(status) < FINAL_RANK:
        # If no final callback comes, the message statistics are asked for its status (enrich.py).
        fields.update(next_check_at=now + dt.timedelta(seconds=settings.enrich_stale_after))
    return fields


def forward_update(status: str, code, now, settings) -> dict:
    """UPDATE expressions that apply `status` to an existing message row if it moves it forward.

    Used by the callback upsert and by the enrichment loop's lost-callback refresh, so the rule
    lives in one place and is applied by the database inside one statement (no read-then-write race).
    """
    rank = rank_of(status)
    moves = Message.status_rank < rank
    if rank < FINAL_RANK:
        moves |= (Message.status_rank == rank) & (Message.status != status)
    update = {
        Message.status: Case(None, [(moves, status)], Message.status),
        Message.status_code: Case(None, [(moves, code)], Message.status_code),
        Message.status_rank: Case(None, [(moves, rank)], Message.status_rank),
        Message.status_at: Case(None, [(moves, now)], Message.status_at),
        Message.last_seen_at: now,
    }
    not_started = Message.stage == STAGE_NONE
    if status == DELIVERED:
        # Any DELIVERED starts enrichment, even one that lost the race to another final status:
        # TWIN says a chat session was started.
        update.update({
            Message.delivered_at: fn.COALESCE(Message.delivered_at, now),
            Message.stage: Case(None, [(not_started, STAGE_CHAT_ID)], Message.stage),
            Message.next_check_at: Case(None, [(not_started, _first_check_at(now, settings))],
                                        Message.next_check_at),
        })
    elif rank >= FINAL_RANK:
        # Failed for good: nothing left to ask TWIN about it.
        update[Message.next_check_at] = Case(None, [(moves & not_started, None)], Message.next_check_at)
    return update


def _first_check_at(now, settings):
    return now + dt.timedelta(seconds=settings.enrich_first_check)
