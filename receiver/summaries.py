"""Stored summaries: each mailing's tally (results.Tally), counted by the worker, added up by the readers.

One MailingSummary row per callbackData and per bulkId. A round (`plan`, `count_unit`, `finish`; the
worker's PeriodicSummaries) counts again only the mailings that may have changed since the last round
began: a callback since (event ids), a message first seen since (sends store no event), open messages
(enrichment stores no event); each looks SLACK further back, for late commits and clock skew. "All
messages" is the bulks' rows plus a live count of the messages without a bulkId. Readers say how old the
counts are (`as_of`) and count live before a first round and for any filter beyond one mailing. Nothing
is added to the callback path. Why and how: docs/results.md, "Stored summaries".
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from peewee import fn

from . import results
from .db import utcnow, write_transaction
from .models import ACTIVE_STAGES, STAGE_NONE, Event, Fact, MailingSummary, Message, callback_data_is

CALLBACK_DATA, BULK_ID = "callbackData", "bulkId"
KINDS = {CALLBACK_DATA: Message.callback_data, BULK_ID: Message.bulk_id}
SLACK = dt.timedelta(minutes=1)
# Fact keys: where the last finished round began.
EVENT_MARK, TIME_MARK = "summaries_event_id", "summaries_as_of"


def unit_key(kind: str, value: str) -> str:
    """A short primary key for any value (a callbackData may be 10 KB)."""
    return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()}"


def _unit_where(kind: str, value: str):
    if kind == CALLBACK_DATA:
        return lambda query: query.where(callback_data_is(value))
    return lambda query: query.where(Message.bulk_id == value)


def _without_bulk_id(query):
    """Messages with no bulkId: "all messages" adds them, counted live, to the stored bulks (TWIN gives
    every message a bulkId; only a message known from elsewhere may lack one)."""
    return query.where(Message.bulk_id.is_null())


def _open(where) -> int:
    """Messages enrichment may still change without a callback: those it will look at again."""
    may_change = (Message.stage.in_(list(ACTIVE_STAGES))
                  | ((Message.stage == STAGE_NONE) & Message.next_check_at.is_null(False)))
    return where(Message.select(fn.COUNT(Message.id))).where(may_change).scalar() or 0


# ---- the worker's side ---------------------------------------------------------------------------

@dataclass
class Round:
    """The mailings to count again, and where this round began (stored once it has finished)."""
    started_at: dt.datetime
    event_id: int
    units: list[tuple[str, str]] = field(default_factory=list)


def plan(now: dt.datetime | None = None) -> Round:
    started_at = now or utcnow()
    # The last event older than SLACK: walking the ids down from the newest reads only the last minute's.
    event_id = (Event.select(Event.id).where(Event.received_at < started_at - SLACK)
                .order_by(Event.id.desc()).limit(1).scalar()) or 0
    marks = dict(Fact.select(Fact.key, Fact.value).where(Fact.key.in_([EVENT_MARK, TIME_MARK])).tuples())
    units: dict[tuple[str, str], None] = {}
    if TIME_MARK not in marks:
        units.update(dict.fromkeys(_every_unit()))
    else:
        since = dt.datetime.fromisoformat(marks[TIME_MARK]) - SLACK
        changed = (Message.select(Message.callback_data, Message.bulk_id)
                   .join(Event, on=(Event.message_id == Message.id)).where(Event.id > int(marks[EVENT_MARK])))
        new = Message.select(Message.callback_data, Message.bulk_id).where(Message.first_seen_at >= since)
        for query in (changed, new):
            units.update(dict.fromkeys(_units_of(query.distinct().tuples())))
        units.update(dict.fromkeys(MailingSummary.select(MailingSummary.kind, MailingSummary.value)
                                   .where(MailingSummary.open > 0).tuples()))
    return Round(started_at, event_id, list(units))


def _every_unit() -> Iterable[tuple[str, str]]:
    for kind, column in KINDS.items():
        for (value,) in Message.select(column).where(column.is_null(False)).distinct().tuples():
            yield kind, value


def _units_of(pairs) -> Iterable[tuple[str, str]]:
    for callback_data, bulk_id in pairs:
        if callback_data is not None:
            yield CALLBACK_DATA, callback_data
        if bulk_id is not None:
            yield BULK_ID, bulk_id


def count_unit(kind: str, value: str, counted_at: dt.datetime) -> None:
    """Count one mailing now and store its row."""
    where = _unit_where(kind, value)
    counted = results.tally(where)
    newest = where(Message.select(fn.MAX(Message.first_seen_at))).scalar()
    if isinstance(newest, str):           # SQLite gives an aggregate of a date back as text
        newest = dt.datetime.fromisoformat(newest)
    row = {MailingSummary.kind: kind, MailingSummary.value: value, MailingSummary.messages: counted.sent,
           MailingSummary.open: _open(where), MailingSummary.last_first_seen_at: newest,
           MailingSummary.tally: json.dumps(counted.as_json(), ensure_ascii=False),
           MailingSummary.counted_at: counted_at}
    with write_transaction():
        (MailingSummary.insert({MailingSummary.key: unit_key(kind, value), **row})
         .on_conflict(conflict_target=[MailingSummary.key], update=row).execute())


def finish(done: Round) -> None:
    """The round is over: the next one looks only at what changed since it began."""
    with write_transaction():
        for key, value in ((EVENT_MARK, str(done.event_id)), (TIME_MARK, done.started_at.isoformat())):
            Fact.insert(key=key, value=value).on_conflict(
                conflict_target=[Fact.key], update={Fact.value: value}).execute()


def refresh(now: dt.datetime | None = None) -> int:
    """A whole round at once (the CLI, the bench, tests); the number of mailings counted."""
    this = plan(now)
    for kind, value in this.units:
        count_unit(kind, value, this.started_at)
    finish(this)
    return len(this.units)


# ---- the readers' side ---------------------------------------------------------------------------

def as_of() -> dt.datetime | None:
    """When the last finished round began: the stored rows hold every change before it. None: no
    round has finished yet (the readers count live)."""
    value = Fact.select(Fact.value).where(Fact.key == TIME_MARK).scalar()
    return dt.datetime.fromisoformat(value) if value else None


@dataclass
class Read:
    summary: results.Summary
    as_of: dt.datetime | None        # None: counted live, now


def summary(filters: results.Filters) -> Read:
    """The summary for the filters: from the stored rows when the filters name all messages or one
    mailing and a round has finished, else counted live."""
    stored = stored_tally(filters)
    if stored is None:
        return Read(results.summarize(filters), None)
    return Read(stored[0].summary(), stored[1])


def _all_messages() -> results.Tally:
    """Every message's tally: the stored bulks' rows added up, and the messages without a bulkId."""
    total = results.tally(_without_bulk_id)
    for (text,) in MailingSummary.select(MailingSummary.tally).where(
            MailingSummary.kind == BULK_ID).tuples().iterator():
        total.add(results.Tally.from_json(json.loads(text)))
    return total


def mailings(limit: int = 200) -> list[results.Mailing] | None:
    """The most recent mailings from the stored rows, newest first; None until a round has finished."""
    if as_of() is None:
        return None
    found = []
    for kind in KINDS:
        query = (MailingSummary.select(MailingSummary.value, MailingSummary.messages,
                                       MailingSummary.last_first_seen_at)
                 .where(MailingSummary.kind == kind)
                 .order_by(MailingSummary.last_first_seen_at.desc()).limit(limit))
        found.extend(results.Mailing(kind, value, messages, seen) for value, messages, seen in query.tuples())
    return found


def stored_tally(filters: results.Filters) -> tuple[results.Tally, dt.datetime] | None:
    """(the stored tally, as of when) for the filters (all messages, or one callbackData or bulkId,
    nothing else), or None when they must be counted live."""
    stored_at = as_of()
    if stored_at is None or filters != filters.mailing_only():
        return None
    if filters.callback_data is None and filters.bulk_id is None:
        return _all_messages(), stored_at
    if filters.callback_data is not None and filters.bulk_id is not None:
        return None
    kind, value = ((CALLBACK_DATA, filters.callback_data) if filters.callback_data is not None
                   else (BULK_ID, filters.bulk_id))
    row = MailingSummary.get_or_none(MailingSummary.key == unit_key(kind, value))
    if row is None or row.value != value:
        return None
    return results.Tally.from_json(json.loads(row.tally)), stored_at


def result_keys(filters: results.Filters) -> list[str] | None:
    """The result.<field> columns of an export from the stored tally (a field first given since the
    last round has no column of its own yet: it is in `result`), or None: find them live."""
    stored = stored_tally(filters)
    return None if stored is None else stored[0].summary().keys
