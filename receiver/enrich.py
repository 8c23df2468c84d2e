"""Enrichment: delivered messages -> chat session id -> the bot's result.

Rules: the database row is the queue (due when `next_check_at` has passed); a batch of due messages of
one stage is claimed with a lease, looked up with ONE windowed, paginated statistics query, and what
comes back is matched by id, never by position, and applied to every stored message a page names.
A TWIN failure releases the batch unchanged; only a sweep TWIN answered gives a message up.
Stages, re-checks, horizons and the call budget: README.md ("How it works"), docs/results.md.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from peewee import Case, PostgresqlDatabase, fn

from . import forwarding
from .callbudget import CallBudget
from .db import db, earliest, utcnow, write_transaction
from .health import remember_twin_error, remember_twin_ok
from .models import (
    STAGE_CHAT_ID,
    STAGE_DONE,
    STAGE_GIVEN_UP,
    STAGE_NONE,
    STAGE_RESULT,
    Message,
)
from .settings import Settings
from .status import forward_update, is_final
from .twin24 import MESSAGE_FIELDS, SESSION_FIELDS, TwinClient, TwinError

log = logging.getLogger(__name__)

CHUNK = 500                     # ids per IN (...) list: well under SQLite's variable limit
WRITE_CHUNK = 100               # messages updated one by one per transaction: the write lock is held briefly
# How far a window reaches back before a message: ENRICH_WINDOW_MARGIN * 2**(misses - 5), so a first
# look at a fresh message pages through little more than its own mailing (20 s before it, by
# default), and a message missed again and again is looked for in a window growing to 8 margins.
NARROWEST, WIDEST = -5, 3
CLOSED_SESSION_STATES = {"CLOSED", "FINISHED", "COMPLETED", "ENDED", "INACTIVE", "ARCHIVED", "DONE"}
MESSAGE_STAGES = (STAGE_CHAT_ID, STAGE_NONE)    # served by the message statistics
SESSION_STAGES = (STAGE_RESULT,)                # served by the chat-session statistics
SESSION_SLACK = dt.timedelta(seconds=2)   # around a startedAt TWIN gave us (its clock, whole seconds)

# What a sweep learned about one claimed message.
SEEN_DONE = "done"              # nothing more to do in this stage
SEEN_WAITING = "waiting"        # found, but what we want is not there yet


@dataclass(frozen=True)
class Sweep:
    """One kind of statistics query: the stages of the messages it serves, how often it may run,
    how its pages are fetched, and how a page is applied (-> what it saw of each stored message)."""
    endpoint: str
    stages: tuple[str, ...]
    interval: Callable[[Settings], float]
    fetch: Callable[[TwinClient, dt.datetime, dt.datetime], Iterable[list]]
    apply: Callable[[list[dict], dt.datetime, Settings], dict[str, str]]


@dataclass(frozen=True)
class Horizon:
    """How long a message may wait in a stage, and what the row says when it is given up."""
    seconds: Callable[[Settings], float]
    reason: str


HORIZONS = {
    STAGE_NONE: Horizon(lambda s: s.enrich_chat_id_horizon, "no final status from TWIN"),
    STAGE_CHAT_ID: Horizon(lambda s: s.enrich_chat_id_horizon, "no chat session id in TWIN's message statistics"),
    STAGE_RESULT: Horizon(lambda s: s.enrich_result_horizon, "no bot result"),
}


class Enricher:
    """The sweeps: claim the due messages of a stage, page through TWIN's statistics for them, apply
    what it says, settle the rest. The worker (receiver/worker.py) calls `run_once` each pass."""

    def __init__(self, settings: Settings, client: TwinClient, clock=utcnow, budget: CallBudget | None = None):
        self.settings = settings
        self.client = client
        self.clock = clock
        self.budget = budget                      # the client's pacer: a sweep starts only with a slot free
        self.last_sweep: dict[str, float] = {}    # endpoint -> time.monotonic() of its last sweep
        self.failures = 0                         # sweeps failed in a row (TWIN down, credentials wrong)
        self.twin_tried = False                   # a first sweep that fails points the operator at check-twin

    def run_once(self, force: bool = False) -> int:
        """One sweep of each stage that has due messages. Returns how many messages were claimed."""
        claimed = 0
        for sweep in SWEEPS:
            if force or self.worth_sweeping(sweep):
                claimed += self.sweep(sweep)
        return claimed

    def worth_sweeping(self, sweep: Sweep) -> bool:
        """Whether the due messages are worth the TWIN calls a sweep costs now.

        The calls are a budget (TWIN24_MAX_CALLS_PER_MINUTE, shared by every worker): a sweep starts
        only when a slot is free, and no sooner than its interval after the last one. A window that
        fits in one page costs one call, whoever is due in it: it is swept as soon as anything is.
        A sweep whose window takes more pages waits until the messages due for their first look
        are a share (ENRICH_BATCH_SHARE) of the messages we know in that window, or the oldest due
        message has waited ENRICH_MAX_WAIT: re-checks alone do not buy a sweep of a big mailing
        sooner, since most of its facts are found ahead of their own messages by earlier sweeps.
        A small mailing sent after a big one has a window of its own, and is looked up at once.
        """
        last = self.last_sweep.get(sweep.endpoint)
        if last is not None and time.monotonic() - last < sweep.interval(self.settings):
            return False
        now = self.clock()
        due, first_looks, oldest, first_seen = due_summary(sweep.stages, now)
        if not due or (self.budget is not None and not self.budget.free()):
            return False
        known = known_since(first_seen - self.reach_back(0))
        if known <= self.settings.twin24_page_size or first_looks >= self.settings.enrich_batch_share * known:
            return True
        return (now - oldest).total_seconds() >= self.settings.enrich_max_wait

    # -- one sweep ----------------------------------------------------------------------------

    def sweep(self, sweep: Sweep) -> int:
        now = self.clock()
        claimed = claim_due(sweep.stages, now, self.settings.enrich_batch_size, self.settings.enrich_lease)
        if not claimed:
            return 0
        self.last_sweep[sweep.endpoint] = time.monotonic()
        start, end = self.window(sweep, claimed, now)
        wanted = {m.id for m in claimed}
        seen: dict[str, str] = {}
        try:
            for page in sweep.fetch(self.client, start, end):
                seen.update(sweep.apply(_with_ids(page), self.clock(), self.settings))
                if wanted <= seen.keys():
                    break                      # everything we came for is found: stop paging
                renew_lease(claimed, self.clock(), self.settings.enrich_lease)
        except TwinError as error:
            self.failures += 1
            # TWIN may ask for a longer pause than the client waits within one call (TWIN24_MAX_RETRY_WAIT).
            delay = max(self.backoff(self.failures), error.retry_after or 0.0)
            log.warning("%s sweep failed, %d messages due again in %.0f s: %s", sweep.endpoint, len(claimed),
                        delay, error)
            remember_twin_error(error, now)
            if not self.twin_tried:
                log.warning("the worker's first TWIN call failed: run `python -m receiver check-twin` to see "
                            "each step TWIN answers and which setting to look at")
            self.twin_tried = True
            release(claimed, self.clock() + dt.timedelta(seconds=delay), str(error))
            return len(claimed)
        self.failures = 0
        self.twin_tried = True
        remember_twin_ok(sweep.endpoint, now)
        self.settle(sweep, claimed, seen)
        log.info("%s sweep: %d claimed, %d found, window %s .. %s", sweep.endpoint, len(claimed),
                 sum(1 for m in claimed if m.id in seen), start.isoformat(), end.isoformat())
        return len(claimed)

    def window(self, sweep: Sweep, claimed: list, now: dt.datetime):
        """The statistics window that covers every claimed message, wider for those missed before.

        TWIN filters message statistics by creation time and sessions by start time (our reading
        of its API). Until TWIN has told us a session's startedAt, we only know when our callbacks
        came, so each message's anchor is padded by a reach that doubles each time the message
        was not found. Once it has, the window is that moment by TWIN's own clock: re-checks for
        a bot's answer then page through a few seconds of sessions, not the whole mailing.
        """
        margin = self.settings.enrich_window_margin
        latest = now + dt.timedelta(seconds=max(margin, 60.0))
        starts, ends = [], []
        for message in claimed:
            if message.session_started_at is not None:
                starts.append(message.session_started_at - SESSION_SLACK)
                ends.append(message.session_started_at + SESSION_SLACK)
                continue
            starts.append(window_anchor(message) - self.reach_back(message.attempts))
            ends.append(latest)
        return _aware(min(starts)), _aware(max(ends))

    def reach_back(self, attempts: int) -> dt.timedelta:
        """How far before a message's anchor its window starts, after `attempts` misses."""
        widening = 2.0 ** min(NARROWEST + attempts, WIDEST)
        return dt.timedelta(seconds=self.settings.enrich_window_margin * widening)

    def settle(self, sweep: Sweep, claimed: Claim, seen: dict[str, str]) -> None:
        """Release the batch, and schedule what this sweep did not finish: later, or never.

        Messages that share a stage and an attempt count are rescheduled by one UPDATE, in short
        transactions: a sweep of 20,000 messages must not hold SQLite's write lock for seconds
        while callbacks wait for it.
        """
        now = self.clock()
        given_up: dict[tuple[str, str], list[str]] = defaultdict(list)    # (stage, reason) -> ids
        again: dict[tuple[str, int, str, float], list[str]] = defaultdict(list)   # (stage, attempts, why, delay)
        for message in claimed:
            outcome = seen.get(message.id)
            if outcome == SEEN_DONE:
                continue
            horizon = HORIZONS[message.stage]
            wait = dt.timedelta(seconds=horizon.seconds(self.settings))
            if now - message_anchor(message) > wait:
                given_up[message.stage, f"{horizon.reason} within {_hours(wait)}"].append(message.id)
            else:
                why = "found, not complete yet" if outcome == SEEN_WAITING else "not in the statistics yet"
                again[message.stage, message.attempts + 1, why, self.recheck_delay(message, now)].append(message.id)
        lease = claimed.lease_until
        log.debug("releasing lease %s of %d messages: settled", lease, len(claimed))
        for (stage, reason), ids in given_up.items():
            if stage == STAGE_RESULT:
                # The bot answered, but TWIN never said the dialog closed: the last answer is the answer.
                _update_in_chunks(ids, lease, stage, Message.result.is_null(False), stage=STAGE_DONE,
                                  next_check_at=None, lease_until=None, last_error=None)
            _update_in_chunks(ids, lease, stage, stage=STAGE_GIVEN_UP, given_up_reason=reason,
                              next_check_at=None, lease_until=None, last_error=None,
                              emit=forwarding.EVENT_GIVEN_UP)
        for (stage, attempts, why, delay), ids in again.items():
            _update_in_chunks(ids, lease, stage, attempts=attempts, last_error=why, lease_until=None,
                              next_check_at=now + dt.timedelta(seconds=delay))
        # The rest (done, or moved on to another stage meanwhile) only give their lease back.
        _update_in_chunks([m.id for m in claimed], lease, None, lease_until=None)

    def recheck_delay(self, message, now: dt.datetime) -> float:
        """Seconds until a message this sweep did not finish is due again: ENRICH_RECHECK_SHARE of the
        time it has spent in its stage (at least ENRICH_FIRST_CHECK, at most ENRICH_BACKOFF_MAX).

        So a fact TWIN's statistics show is stored within about that share of the message's age: a
        result that comes 40 s after delivery waits some 10 s, one that comes hours later at most
        ENRICH_BACKOFF_MAX; a message with no answer is looked at a few times a minute at first, then
        ever less often. Rounded to two digits, so a sweep's messages are rescheduled by a few UPDATEs.
        """
        age = (now - message_anchor(message)).total_seconds()
        delay = min(max(self.settings.enrich_recheck_share * age, self.settings.enrich_first_check),
                    self.settings.enrich_backoff_max)
        return float(f"{delay:.2g}")

    def backoff(self, failures: int) -> float:
        """Seconds until a batch is due again after a failed sweep: growing, capped, with jitter."""
        base = self.settings.enrich_backoff_start * 2 ** min(failures - 1, 20)
        return min(self.settings.enrich_backoff_max, base) * random.uniform(0.9, 1.1)


# -- claiming ---------------------------------------------------------------------------------

class Claim(list):
    """The rows of claimed messages, and the lease they were claimed with: a worker only writes
    back to rows that still carry its own lease (an expired one may have been claimed again)."""

    def __init__(self, rows=(), lease_until: dt.datetime | None = None):
        super().__init__(rows)
        self.lease_until = lease_until


def claim_due(stages: tuple[str, ...], now: dt.datetime, limit: int, lease_seconds: float) -> Claim:
    """Lease up to `limit` due messages of a stage, the longest overdue first. Two workers never hold
    the same message.

    Each claimed message is a row with the columns a sweep needs (id, stage, attempts, and the
    times its window and horizon are reckoned from).

    Claimed CHUNK at a time, each in a transaction of its own, so that the write lock is never
    held long.
    """
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    is_postgres = isinstance(db.obj, PostgresqlDatabase)
    claimed = Claim(lease_until=lease_until)
    while len(claimed) < limit:
        due = (Message
               .select(Message.id, Message.stage, Message.attempts, Message.sent_at, Message.first_seen_at,
                       Message.delivered_at, Message.chat_id_at, Message.session_started_at)
               .where(Message.stage.in_(list(stages)), Message.next_check_at <= now,
                      (Message.lease_until.is_null()) | (Message.lease_until < now))
               .order_by(Message.next_check_at)
               .limit(min(CHUNK, limit - len(claimed)))
               .namedtuples())       # a batch holds up to ENRICH_BATCH_SIZE of them: light rows, not models
        with write_transaction():
            # PostgreSQL: rows another worker is claiming right now are skipped, not waited for.
            # SQLite: the write lock taken at BEGIN already makes claims one at a time.
            batch = list(due.for_update("FOR UPDATE SKIP LOCKED") if is_postgres else due)
            if batch:
                Message.update(lease_until=lease_until).where(Message.id.in_([m.id for m in batch])).execute()
        if batch and log.isEnabledFor(logging.DEBUG):
            log.debug("claimed %d messages with lease %s: %s", len(batch), lease_until, _by_stage(batch))
        claimed += batch
        if len(batch) < CHUNK:
            break
    return claimed


def due_summary(stages: tuple[str, ...], now: dt.datetime) -> tuple[int, int, dt.datetime | None, dt.datetime | None]:
    """How many messages of these stages are due and unclaimed, how many of them for their first look
    in the stage, since when the oldest is due, and the earliest first sighting among them."""
    first_look = fn.SUM(Case(None, [(Message.attempts == 0, 1)], 0))
    return (Message
            .select(fn.COUNT(Message.id), fn.COALESCE(first_look, 0), earliest(Message.next_check_at),
                    earliest(Message.first_seen_at))
            .where(Message.stage.in_(list(stages)), Message.next_check_at <= now,
                   (Message.lease_until.is_null()) | (Message.lease_until < now))
            .tuples()
            .get())


def known_since(moment: dt.datetime) -> int:
    """How many messages we know that were first seen since `moment`: about what a statistics
    window starting then holds (TWIN's may hold more: sends that did not name us as callbackUrl)."""
    return Message.select().where(Message.first_seen_at >= moment).count()


def release(claimed: Claim, due_at: dt.datetime, error: str) -> None:
    """Give the claimed messages back after a sweep TWIN did not answer: only when they are due next and
    `last_error` change; no stage moves, and none is given up."""
    log.debug("releasing lease %s of %d messages: %s", claimed.lease_until, len(claimed), error[:200])
    _update_in_chunks([m.id for m in claimed], claimed.lease_until, None, lease_until=None,
                      next_check_at=due_at, last_error=error[:500])


def renew_lease(claimed: Claim, now: dt.datetime, lease_seconds: float) -> None:
    """Extend the lease once half of it is spent: a sweep that pages through a slow TWIN for longer
    than ENRICH_LEASE must not see its messages claimed again by another worker meanwhile."""
    if now + dt.timedelta(seconds=lease_seconds / 2) < claimed.lease_until:
        return
    renewed = now + dt.timedelta(seconds=lease_seconds)
    _update_in_chunks([m.id for m in claimed], claimed.lease_until, None, lease_until=renewed)
    log.debug("renewed lease %s of %d messages to %s", claimed.lease_until, len(claimed), renewed)
    claimed.lease_until = renewed


def _update_in_chunks(ids: list[str], leased: dt.datetime, in_stage: str | None, *conditions, emit: str | None = None,
                      **values) -> None:
    """UPDATE these messages, those still under this lease (and still `in_stage`, when given, and
    meeting `conditions`), CHUNK ids per transaction. With `emit`, the messages updated get that
    forwarding event, written in the same transaction.

    On PostgreSQL the rows are locked in id order first, the order in which page applications take
    them (_stored): a multi-row UPDATE locks rows in whatever order its plan reads them, and another
    worker applying a page that names some of these messages would then deadlock with it."""
    lock_first = isinstance(db.obj, PostgresqlDatabase)
    for chunk in _chunks(sorted(ids)):
        where = [Message.id.in_(chunk), Message.lease_until == leased, *conditions]
        if in_stage is not None:
            where.append(Message.stage == in_stage)
        with write_transaction():
            if lock_first:
                list(Message.select(Message.id).where(Message.id.in_(chunk)).order_by(Message.id).for_update())
            updated = [m.id for m in Message.select(Message.id).where(*where)] if emit else []
            Message.update(**values).where(*where).execute()
            if updated:
                forwarding.emit(emit, updated)


# -- applying what TWIN said ------------------------------------------------------------------

def apply_messages(items: list[dict], now: dt.datetime, settings) -> dict[str, str]:
    """Apply message statistics to the stored messages they name: status, and chat session id."""
    by_id = {item["id"]: item for item in items}
    first_check = now + dt.timedelta(seconds=settings.enrich_first_check)
    seen: dict[str, str] = {}
    for chunk in _chunks(list(by_id), WRITE_CHUNK):
        with write_transaction():
            for message in _stored(Message.id, chunk, MESSAGE_STAGES):
                seen[message.id] = apply_message_item(message, by_id[message.id], now, first_check, settings)
    return seen


def apply_message_item(message: Message, item: dict, now, first_check, settings) -> str:
    status = item.get("status")
    if isinstance(status, str) and status.strip():
        status = status.strip().upper()
        # Statistics carry no status code: keep the one we have if the status moves.
        Message.update(forward_update(status, Message.status_code, now, settings)).where(
            Message.id == message.id).execute()
    chat_id = item.get("providerMessageId")
    if isinstance(chat_id, (str, int)) and str(chat_id).strip() and message.stage in (STAGE_NONE, STAGE_CHAT_ID):
        Message.update(
            chat_id=str(chat_id), chat_id_at=now, stage=STAGE_RESULT, attempts=0,
            next_check_at=first_check, lease_until=None, last_error=None,
            delivered_at=fn.COALESCE(Message.delivered_at, now),
        ).where(Message.id == message.id, Message.stage.in_([STAGE_NONE, STAGE_CHAT_ID])).execute()
        return SEEN_DONE
    if message.stage == STAGE_NONE and isinstance(status, str) and is_final(status):
        return SEEN_DONE       # settled: forward_update scheduled what comes next
    return SEEN_WAITING


def apply_sessions(items: list[dict], now: dt.datetime, settings) -> dict[str, str]:
    """Apply chat-session statistics to the messages whose chat id they carry: the bot's result."""
    by_chat_id = {item["id"]: item for item in items}
    seen: dict[str, str] = {}
    for chunk in _chunks(list(by_chat_id), WRITE_CHUNK):
        with write_transaction():
            for message in _stored(Message.chat_id, chunk, SESSION_STAGES):
                seen[message.id] = apply_session(message, by_chat_id[message.chat_id], now)
    return seen


def apply_session(message: Message, session: dict, now) -> str:
    result = bot_result(session.get("dialogResultsFromBotJson"))
    closed = session_closed(session)
    update = {
        Message.session: json.dumps(session, ensure_ascii=False, separators=(",", ":")),
        Message.session_status: _short(session.get("status")),
        Message.bot_status: _short(session.get("botStatus")),
        Message.session_started_at: twin_time(session.get("startedAt")),
    }
    outcome = SEEN_WAITING      # found; the bot may still answer, or change its answer
    if result is not None:
        if result != message.result:
            update.update({Message.result: result, Message.result_at: now})
        if closed:
            update.update({Message.stage: STAGE_DONE, Message.next_check_at: None,
                           Message.lease_until: None, Message.last_error: None})
            outcome = SEEN_DONE
    elif closed:
        update.update({Message.stage: STAGE_GIVEN_UP, Message.next_check_at: None, Message.lease_until: None,
                       Message.given_up_reason: "the dialog closed without a bot result"})
        outcome = SEEN_DONE
    changed = Message.update(update).where(Message.id == message.id, Message.stage == STAGE_RESULT).execute()
    if changed and Message.stage in update and update[Message.stage] == STAGE_GIVEN_UP:
        forwarding.emit(forwarding.EVENT_GIVEN_UP, [message.id], now)
    elif changed and Message.result in update:
        forwarding.emit(forwarding.EVENT_RESULT, [message.id], now)     # in this transaction: the outbox
    return outcome


MESSAGES_SWEEP = Sweep("messages_stats", MESSAGE_STAGES, interval=lambda s: s.enrich_sweep_interval,
                       fetch=lambda client, start, end: client.iter_messages(start, end, fields=MESSAGE_FIELDS),
                       apply=apply_messages)
SESSIONS_SWEEP = Sweep("sessions_stats", SESSION_STAGES, interval=lambda s: s.enrich_result_interval,
                       fetch=lambda client, start, end: client.iter_sessions(start, end, fields=SESSION_FIELDS),
                       apply=apply_sessions)
SWEEPS = (MESSAGES_SWEEP, SESSIONS_SWEEP)


def _with_ids(items: list) -> list[dict]:
    """The items of a page that are objects with a string id: the rest cannot be matched to a message."""
    return [item for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]


def _stored(column, values: list, stages: tuple[str, ...]):
    """The stored messages in these stages whose `column` is one of `values`, by id: every worker
    then updates rows in the same order, and two workers applying overlapping pages at once wait
    for each other instead of deadlocking (PostgreSQL)."""
    return list(Message
                .select(Message.id, Message.stage, Message.chat_id, Message.result)
                .where(column.in_(values), Message.stage.in_(stages))
                .order_by(Message.id))


def bot_result(value) -> str | None:
    """dialogResultsFromBotJson as JSON text, or None while the bot has recorded nothing."""
    if isinstance(value, str):
        try:
            value = json.loads(value)     # some answers carry it as a JSON string
        except ValueError:
            return json.dumps(value, ensure_ascii=False) if value.strip() else None
    if not value:
        return None
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def twin_time(value) -> dt.datetime | None:
    """A timestamp from TWIN's statistics as naive UTC; None when absent or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None       # no zone: we cannot tell which moment it names, so do not narrow on it
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def session_closed(session: dict) -> bool:
    states = {str(session.get(key) or "").strip().upper() for key in ("status", "botStatus")}
    return bool(states & CLOSED_SESSION_STATES)


def message_anchor(message: Message) -> dt.datetime:
    """When the message's current stage began, as seen from here: its horizon counts from then."""
    if message.stage == STAGE_RESULT:
        return message.delivered_at or message.chat_id_at or message.first_seen_at
    if message.stage == STAGE_CHAT_ID:
        return message.delivered_at or message.sent_at or message.first_seen_at
    return message.sent_at or message.first_seen_at


def window_anchor(message: Message) -> dt.datetime:
    """Where a statistics window must reach back to for this message. Sessions are listed by their
    start (about when the message was delivered); messages by their creation, which is no later than
    our send or the first callback we had, however long the delivery took."""
    if message.stage == STAGE_RESULT:
        return message_anchor(message)
    return min(t for t in (message.sent_at, message.first_seen_at, message.delivered_at) if t is not None)


def _by_stage(rows) -> str:
    """Claimed rows for a DEBUG line: `stage=id,id,... stage=...`."""
    ids: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        ids[row.stage].append(row.id)
    return " ".join(f"{stage}={','.join(sorted(group))}" for stage, group in sorted(ids.items()))


def _short(value) -> str | None:
    return None if value is None else str(value)[:64]


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC)


def _hours(delta: dt.timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} h" if hours >= 1 else f"{delta.total_seconds():g} s"


def _chunks(values: list, size: int = CHUNK):
    for start in range(0, len(values), size):
        yield values[start:start + size]
