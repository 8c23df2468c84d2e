"""Message statuses: their order, and the one rule for moving a message's status forward.

TWIN's callbacks arrive out of order and in duplicate, and the statistics may report a status
whose callback never came. Whatever the source, a message's current status only moves forward
by rank, so a late PENDING never overwrites DELIVERED. Statuses we have never seen are stored as
they are, ranked after the in-flight ones and before the final ones (FAILED_STATUSES, DELIVERED).
"""
from __future__ import annotations

import datetime as dt

from peewee import Case, fn

from .models import STAGE_CHAT_ID, STAGE_GIVEN_UP, STAGE_NONE, Message

DELIVERED = "DELIVERED"
IN_FLIGHT_STATUSES = ("PENDING", "DELAYED", "PAUSED")
# Failed for good. EXPIRED: the message's validity period ran out before it was delivered.
FAILED_STATUSES = ("UNDELIVERED", "ERROR", "EXPIRED")

CREATED_RANK, IN_FLIGHT_RANK, UNKNOWN_RANK, FAILED_RANK, DELIVERED_RANK = 0, 1, 2, 3, 4
RANKS = {
    "CREATED": CREATED_RANK,
    **dict.fromkeys(IN_FLIGHT_STATUSES, IN_FLIGHT_RANK),
    **dict.fromkeys(FAILED_STATUSES, FAILED_RANK),
    DELIVERED: DELIVERED_RANK,                # a delivered message cannot become undelivered
}
# Below this rank a status may move sideways (PENDING -> DELAYED -> PENDING); from it on, only up.
FINAL_RANK = FAILED_RANK

# Where a message stands, from its stored status_rank (one GROUP BY on message, see api.py's /metrics).
# A message TWIN created but has not yet tried is still under way, like one in flight.
OUTCOMES = ("delivered", "failed", "in_flight", "other")
OUTCOME_OF_RANK = {CREATED_RANK: "in_flight", IN_FLIGHT_RANK: "in_flight", UNKNOWN_RANK: "other",
                   FAILED_RANK: "failed", DELIVERED_RANK: "delivered"}

# The only status codes TWIN confirms; a callback without a status is read by these.
STATUS_OF_CODE = {2: "PENDING", 6: DELIVERED}


def rank_of(status: str) -> int:
    return RANKS.get(status.upper(), UNKNOWN_RANK)


def is_final(status: str) -> bool:
    return rank_of(status) >= FINAL_RANK


def outcome_of_rank(rank: int) -> str:
    """delivered / failed / in_flight / other, for a stored status_rank."""
    return OUTCOME_OF_RANK.get(rank, "other")


def outcome_of(status: str) -> str:
    """delivered / failed / in_flight / other, for a status."""
    return outcome_of_rank(rank_of(status))


def variant(status: str) -> tuple[int, bool]:
    """What the SQL of a status change depends on: the status's rank, and whether it is DELIVERED."""
    return rank_of(status), status == DELIVERED


def check_times(now, settings) -> tuple:
    """(first look for a delivered message's chat id, look at the statistics for one stuck in flight)."""
    return (now + dt.timedelta(seconds=settings.enrich_first_check),
            now + dt.timedelta(seconds=settings.enrich_stale_after))


def new_message_fields(status: str, code: int | None, now, settings) -> dict:
    """Column values for a message first learned of with this status."""
    return new_fields_for(variant(status), status, code, now, *check_times(now, settings))


def forward_update(status: str, code, now, settings) -> dict:
    """UPDATE expressions that apply `status` to an existing message row if it moves it forward.

    Used by the callback upsert, the sends and the enrichment loop's lost-callback refresh, so the
    rule lives in one place and is applied by the database inside one statement (no read-then-write
    race).
    """
    return forward_update_for(variant(status), status, code, now, check_times(now, settings)[0])


# The two functions below take the values as plain values or as SQL expressions (the callback path
# passes `slot`s of a prepared statement); only `variant` decides the shape of the SQL.

def new_fields_for(variant: tuple[int, bool], status, code, now, first_check_at, stale_check_at) -> dict:
    rank, delivered = variant
    fields = {
        "status": status, "status_code": code, "status_rank": rank, "status_at": now,
        "first_seen_at": now, "last_seen_at": now,
    }
    if delivered:
        fields.update(delivered_at=now, stage=STAGE_CHAT_ID, next_check_at=first_check_at)
    elif rank < FINAL_RANK:
        # If no final callback comes, the message statistics are asked for its status (enrich.py).
        fields.update(next_check_at=stale_check_at)
    return fields


def forward_update_for(variant: tuple[int, bool], status, code, now, first_check_at) -> dict:
    rank, delivered = variant
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
    if delivered:
        # Any DELIVERED starts enrichment, even one that lost the race to another final status:
        # TWIN says a chat session was started. So does a DELIVERED that comes after we gave up
        # waiting for the message's final status.
        starts = not_started | ((Message.stage == STAGE_GIVEN_UP) & Message.chat_id.is_null())
        update.update({
            Message.delivered_at: fn.COALESCE(Message.delivered_at, now),
            Message.stage: Case(None, [(starts, STAGE_CHAT_ID)], Message.stage),
            Message.next_check_at: Case(None, [(starts, first_check_at)], Message.next_check_at),
            Message.attempts: Case(None, [(starts, 0)], Message.attempts),
            Message.given_up_reason: Case(None, [(starts, None)], Message.given_up_reason),
        })
    elif rank >= FINAL_RANK:
        # Failed for good: nothing left to ask TWIN about it.
        update[Message.next_check_at] = Case(None, [(moves & not_started, None)], Message.next_check_at)
    return update
