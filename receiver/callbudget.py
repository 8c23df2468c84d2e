"""TWIN24_MAX_CALLS_PER_MINUTE: a ceiling on the TWIN calls of every process sharing one database.

Rules: every HTTP attempt (a retry too) first reserves a slot, a `twin_call_slot` row, in a write
transaction that counts the last WINDOW; reservations run one at a time (SQLite's write lock, on
PostgreSQL an advisory lock), so two workers never both take the last slot. The wait comes before a
byte goes out, so it can never make TWIN take a send twice; sends keep HEADROOM (a tenth) for themselves.
The setting and what it means for several workers: README.md ("How it works", "Settings").
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from peewee import PostgresqlDatabase

from .db import db, utcnow, write_transaction
from .models import TwinCallSlot

log = logging.getLogger(__name__)

# A minute, plus a second: a call reserved at t reaches TWIN a moment later, so a slot is kept a
# little longer than the minute TWIN may count it in.
WINDOW = dt.timedelta(seconds=61)
ADVISORY_LOCK = 0x7477696E   # "twin": the PostgreSQL advisory lock that queues reservations
SEND_ENDPOINTS = ("send",)


class CallBudget:
    """Reserves a slot per TWIN call; `reserve` is the TwinClient's `pacer` hook."""

    def __init__(self, per_minute: int, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.per_minute = per_minute
        self.headroom = per_minute // 10        # kept for sends
        self.sleep = sleep
        self.clock = clock

    @classmethod
    def from_settings(cls, settings, **kwargs) -> CallBudget | None:
        """The budget of TWIN24_MAX_CALLS_PER_MINUTE; None when it is 0 (no ceiling)."""
        per_minute = settings.twin24_max_calls_per_minute
        return cls(per_minute, **kwargs) if per_minute > 0 else None

    @classmethod
    def pacer(cls, settings) -> Callable[[str], float] | None:
        """The TwinClient `pacer` hook for these settings: None when there is no ceiling."""
        budget = cls.from_settings(settings)
        return budget.reserve if budget else None

    def limit_for(self, endpoint: str) -> int:
        return self.per_minute if endpoint in SEND_ENDPOINTS else self.per_minute - self.headroom

    def reserve(self, endpoint: str) -> float:
        """Take a slot for one call to `endpoint`, waiting as long as it takes. Returns the seconds waited."""
        waited = 0.0
        while True:
            wait = self.try_reserve(endpoint)
            if wait <= 0:
                if waited:
                    log.info("TWIN %s: waited %.1f s for a slot of TWIN24_MAX_CALLS_PER_MINUTE=%d",
                             endpoint, waited, self.per_minute)
                return waited
            wait = min(wait, WINDOW.total_seconds())
            self.sleep(wait)
            waited += wait

    def try_reserve(self, endpoint: str) -> float:
        """Take a slot if one is free now (0.0), else the seconds until the oldest one frees."""
        with write_transaction():
            if isinstance(db.obj, PostgresqlDatabase):
                db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
            now = self.clock()
            recent = self._recent(now, self.limit_for(endpoint))
            if len(recent) < self.limit_for(endpoint):
                TwinCallSlot.insert(at=now, endpoint=endpoint[:32]).execute()
                TwinCallSlot.delete().where(TwinCallSlot.at < now - 2 * WINDOW).execute()
                return 0.0
        # The oldest slot that must leave the window before the count is under the limit.
        frees_at = recent[len(recent) - self.limit_for(endpoint)] + WINDOW
        return max((frees_at - now).total_seconds(), 0.01)

    def free(self, endpoint: str = "statistics") -> int:
        """How many calls to `endpoint` could be made now without waiting."""
        now = self.clock()
        return max(0, self.limit_for(endpoint) - len(self._recent(now, self.per_minute)))

    @staticmethod
    def _recent(now: dt.datetime, limit: int) -> list[dt.datetime]:
        """The times of the newest `limit` slots still in the window, oldest first."""
        rows = (TwinCallSlot.select(TwinCallSlot.at).where(TwinCallSlot.at > now - WINDOW)
                .order_by(TwinCallSlot.at.desc()).limit(max(limit, 0)).tuples())
        return sorted(at for (at,) in rows)
