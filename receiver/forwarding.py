"""Forwarding: each result pushed to the operator's URL, signed, durable, retried, replayable.

Rules: an event is a `delivery` row written by emit() inside the transaction of the change that causes
it, so a crash can neither lose nor invent one. deliver_due() claims due rows with a lease; delivery is
at least once, with the event id as `webhook-id`, and the events of one message go one at a time,
oldest first. What arrives, retries, dead events, 410 and replay: docs/forwarding.md.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
from peewee import SQL, PostgresqlDatabase, fn
from standardwebhooks.webhooks import Webhook

from . import results
from .db import db, earliest, utcnow, write_transaction
from .models import Delivery, DeliveryAttempt, Message, Subscription

log = logging.getLogger(__name__)

EVENT_RESULT = "message.result"
EVENT_STATUS = "message.status"
EVENT_GIVEN_UP = "message.given_up"
EVENT_TYPES = (EVENT_RESULT, EVENT_STATUS, EVENT_GIVEN_UP)

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
SENDERS = 8                     # POSTs in flight at once per worker (to different messages)
WANTS_CACHE_SECONDS = 5.0       # how long wants() trusts what it read (the callback path asks it)
USER_AGENT = "twin24-receiver-forwarding"


# -- writing events (inside the caller's transaction) ---------------------------------------------

def emit(event_type: str, message_ids: list[str], now: dt.datetime | None = None, when=None) -> int:
    """Write one delivery per message and enabled subscription that wants `event_type` (and whose
    filter the message passes). Call it inside the write transaction of the change that causes the
    event, after the change: the body is the message's row as it now is. `when(row)` may skip a row.
    Returns how many deliveries were written."""
    if not message_ids:
        return 0
    subscriptions = [s for s in _enabled() if event_type in subscription_events(s)]
    if not subscriptions:
        return 0
    now = now or utcnow()
    rows = []
    for row in _results_rows(message_ids):
        if when is not None and not when(row):
            continue
        for subscription in subscriptions:
            if passes_filter(subscription, row):
                rows.append(_delivery(subscription.id, event_type, row, now))
    for start in range(0, len(rows), 100):
        Delivery.insert_many(rows[start:start + 100]).execute()
    return len(rows)


def _delivery(subscription_id: int, event_type: str, row: dict, now: dt.datetime) -> dict:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {"type": event_type, "id": event_id, "timestamp": results.iso(now), "data": row}
    return {
        "event_id": event_id, "subscription": subscription_id, "message_id": row["message_id"],
        "event_type": event_type, "payload": json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        "state": PENDING, "attempts": 0, "next_attempt_at": now, "created_at": now, "queued_at": now,
    }


def _results_rows(message_ids: list[str]) -> list[dict]:
    """The messages' rows of the results view, shaped as the API shows them (results.row_json)."""
    query = (Message.select(*(f for _, f in results.COLUMNS), Message.result)
             .where(Message.id.in_(list(message_ids))).order_by(Message.id))
    return [results.row_json(row) for row in query.dicts()]


def subscription_events(subscription: Subscription) -> set[str]:
    return {e.strip() for e in (subscription.events or "").split(",") if e.strip()}


def passes_filter(subscription: Subscription, row: dict) -> bool:
    callback_data = row.get("callback_data")
    if subscription.filter_callback_data is not None and callback_data != subscription.filter_callback_data:
        return False
    prefix = subscription.filter_callback_data_prefix
    if prefix is not None and not (callback_data or "").startswith(prefix):
        return False
    return subscription.filter_bulk_id is None or row.get("bulk_id") == subscription.filter_bulk_id


def _enabled() -> list[Subscription]:
    return list(Subscription.select().where(Subscription.disabled_at.is_null()).order_by(Subscription.id))


_wanted: dict[str, tuple[float, bool]] = {}     # event type -> (monotonic time read, wanted)


def wants(event_type: str) -> bool:
    """Whether some enabled subscription wants this event: read at most every WANTS_CACHE_SECONDS, so
    that the callback path pays nothing for message.status events nobody asked for."""
    cached = _wanted.get(event_type)
    if cached is not None and time.monotonic() - cached[0] < WANTS_CACHE_SECONDS:
        return cached[1]
    wanted = any(event_type in subscription_events(s) for s in _enabled())
    _wanted[event_type] = (time.monotonic(), wanted)
    return wanted


def forget_wants() -> None:
    """Subscriptions changed in this process: wants() reads them again."""
    _wanted.clear()


# -- subscriptions --------------------------------------------------------------------------------

def ensure_settings_subscription(settings) -> Subscription | None:
    """Make the subscription FORWARD_URL describes, or bring it up to date; disable it once unset.
    A new URL also clears a 410's disabling and a pause: it is a new target."""
    with write_transaction():
        current = Subscription.get_or_none(Subscription.from_settings == True)  # noqa: E712
        if not settings.forward_url:
            if current is not None and current.disabled_at is None:
                current.disabled_at, current.paused_reason = utcnow(), "FORWARD_URL is not set"
                current.save()
            forget_wants()
            return current
        values = {"url": settings.forward_url, "secret": settings.forward_secret,
                  "previous_secret": settings.forward_secret_previous, "events": settings.forward_events}
        if current is None:
            current = Subscription.create(from_settings=True, **values)
        else:
            if current.url != settings.forward_url or current.paused_reason == "FORWARD_URL is not set":
                values.update(disabled_at=None, paused_at=None, paused_reason=None, failing_since=None)
            Subscription.update(values).where(Subscription.id == current.id).execute()
            current = Subscription.get_by_id(current.id)
    forget_wants()
    return current


# -- delivering -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int | None
    error: str | None
    seconds: float
    retry_after: float | None


def deliver_due(settings, now: dt.datetime | None = None) -> int:
    """One turn of the worker: claim up to FORWARD_BATCH due deliveries, POST them (SENDERS at a time),
    record what the targets answered. Returns how many were attempted."""
    now = now or utcnow()
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    claimed = claim(settings, now, owner)
    if not claimed:
        return 0
    subscriptions = {s.id: s for s in Subscription.select().where(
        Subscription.id.in_(list({d.subscription for d in claimed})))}
    with requests.Session() as session:
        session.headers["User-Agent"] = USER_AGENT
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=SENDERS)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        with ThreadPoolExecutor(max_workers=min(SENDERS, len(claimed))) as pool:
            outcomes = list(pool.map(lambda d: post(session, subscriptions[d.subscription], d, settings),
                                     claimed))
    record(settings, claimed, outcomes, subscriptions, owner)
    return len(claimed)


def claim(settings, now: dt.datetime, owner: str) -> list[Delivery]:
    """Lease due deliveries: of each (subscription, message), only the oldest pending one, so one is in
    flight at a time and they arrive in order. A paused subscription gets one probe per
    FORWARD_PAUSE_PROBE. PostgreSQL: rows another worker is claiming are skipped (SKIP LOCKED)."""
    lease_until = now + dt.timedelta(seconds=2 * settings.forward_timeout + 30)
    with write_transaction():
        subscriptions = _enabled()
        active = [s.id for s in subscriptions if s.paused_at is None]
        probes = [s for s in subscriptions if s.paused_at is not None and _probe_due(s, now, settings)]
        ids = _due_ids(active, now, settings.forward_batch)
        for subscription in probes:
            probe = _due_ids([subscription.id], now, 1)
            if probe:
                ids += probe
                Subscription.update(paused_at=now).where(Subscription.id == subscription.id).execute()
        if not ids:
            return []
        Delivery.update(lease_owner=owner, lease_until=lease_until).where(Delivery.id.in_(ids)).execute()
    return list(Delivery.select().where(Delivery.id.in_(ids), Delivery.lease_owner == owner).order_by(Delivery.id))


def _probe_due(subscription: Subscription, now: dt.datetime, settings) -> bool:
    # paused_at is moved to each probe's time: the next probe is FORWARD_PAUSE_PROBE after it.
    return now - subscription.paused_at >= dt.timedelta(seconds=settings.forward_pause_probe)


def _due_ids(subscription_ids: list[int], now: dt.datetime, limit: int) -> list[int]:
    if not subscription_ids or limit <= 0:
        return []
    older = Delivery.alias()
    earlier_pending = (older.select(SQL("1"))
                       .where(older.subscription == Delivery.subscription, older.message_id == Delivery.message_id,
                              older.state == PENDING, older.id < Delivery.id))
    query = (Delivery.select(Delivery.id)
             .where(Delivery.state == PENDING, Delivery.next_attempt_at <= now,
                    Delivery.subscription.in_(subscription_ids),
                    Delivery.lease_until.is_null() | (Delivery.lease_until < now),
                    ~fn.EXISTS(earlier_pending))
             .order_by(Delivery.id).limit(limit))
    if isinstance(db.obj, PostgresqlDatabase):
        query = query.for_update("FOR UPDATE SKIP LOCKED")
    return [row.id for row in query]


def signature(subscription: Subscription, event_id: str, at: dt.datetime, body: str) -> str:
    """The webhook-signature header: v1,<base64 HMAC-SHA256>, and one with the previous secret while
    a rotation is under way (a target checking either secret accepts it)."""
    secrets_ = [subscription.secret] + ([subscription.previous_secret] if subscription.previous_secret else [])
    return " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets_)


def post(session: requests.Session, subscription: Subscription, delivery: Delivery, settings) -> Outcome:
    """POST one delivery; never raises."""
    at = dt.datetime.now(dt.UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery.event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature(subscription, delivery.event_id, at, delivery.payload),
    }
    started = time.monotonic()
    try:
        response = session.post(subscription.url, data=delivery.payload.encode(), headers=headers,
                                timeout=settings.forward_timeout, allow_redirects=False)
        response.close()
    except requests.RequestException as error:
        return Outcome(None, f"{type(error).__name__}: {error}"[:500], time.monotonic() - started, None)
    seconds = time.monotonic() - started
    if seconds > settings.forward_timeout:
        return Outcome(response.status_code, "answered after FORWARD_TIMEOUT", seconds, None)
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return Outcome(response.status_code, error, seconds, retry_after(response.headers.get("Retry-After")))


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return max(0.0, (moment - dt.datetime.now(dt.UTC)).total_seconds())


def record(settings, claimed: list[Delivery], outcomes: list[Outcome], subscriptions: dict, owner: str) -> None:
    """Write back every attempt and its consequence, in one transaction."""
    now = utcnow()
    with write_transaction():
        DeliveryAttempt.insert_many([
            {"delivery": d.id, "at": now, "status_code": o.status, "error": o.error, "seconds": o.seconds}
            for d, o in zip(claimed, outcomes, strict=True)]).execute()
        for delivery, outcome in zip(claimed, outcomes, strict=True):
            _record_one(settings, delivery, outcome, now, owner)
        for subscription in subscriptions.values():
            mine = [o for d, o in zip(claimed, outcomes, strict=True) if d.subscription == subscription.id]
            _record_subscription(settings, subscription, mine, now)


def _record_one(settings, delivery: Delivery, outcome: Outcome, now: dt.datetime, owner: str) -> None:
    values = {Delivery.attempts: Delivery.attempts + 1, Delivery.last_status: outcome.status,
              Delivery.last_error: outcome.error, Delivery.lease_owner: None, Delivery.lease_until: None}
    if outcome.error is None:
        values.update({Delivery.state: DELIVERED, Delivery.delivered_at: now, Delivery.next_attempt_at: None})
    elif outcome.status == 410:
        values[Delivery.next_attempt_at] = now      # stays pending: due at once should the target come back
    else:
        delay = outcome.retry_after if outcome.retry_after is not None else backoff(settings, delivery.attempts + 1)
        due = now + dt.timedelta(seconds=delay)
        if due - (delivery.queued_at or delivery.created_at) > dt.timedelta(seconds=settings.forward_max_age):
            values.update({Delivery.state: DEAD, Delivery.next_attempt_at: None})
        else:
            values[Delivery.next_attempt_at] = due
    Delivery.update(values).where(Delivery.id == delivery.id, Delivery.lease_owner == owner).execute()


def _record_subscription(settings, subscription: Subscription, outcomes: list[Outcome], now: dt.datetime) -> None:
    """410: disable. Any success: the target is well (a pause ends, its backlog is due at once). Only
    failures: count how long it has failed; past FORWARD_PAUSE_AFTER, pause it with the reason."""
    if not outcomes:
        return
    where = Subscription.id == subscription.id
    if any(o.status == 410 for o in outcomes):
        Subscription.update(disabled_at=now, paused_reason="the target answered 410 Gone").where(where).execute()
        forget_wants()
        log.warning("forwarding to subscription %d disabled: its target answered 410 Gone", subscription.id)
        return
    if any(o.error is None for o in outcomes):
        if subscription.paused_at is not None:
            log.info("forwarding to subscription %d resumed: its target answers again", subscription.id)
            Delivery.update(next_attempt_at=now).where(Delivery.subscription == subscription.id,
                                                       Delivery.state == PENDING).execute()
        Subscription.update(failing_since=None, paused_at=None, paused_reason=None).where(where).execute()
        return
    failing_since = subscription.failing_since or now
    update = {Subscription.failing_since: failing_since}
    failing = now - failing_since
    if subscription.paused_at is None and failing >= dt.timedelta(seconds=settings.forward_pause_after):
        last = outcomes[-1].error
        update.update({Subscription.paused_at: now, Subscription.paused_reason:
                       f"failing since {results.iso(failing_since)} ({last}); retried every "
                       f"{settings.forward_pause_probe:g} s"})
        log.warning("forwarding to subscription %d paused: failing for %.0f s (%s)", subscription.id,
                    failing.total_seconds(), last)
    Subscription.update(update).where(where).execute()


def backoff(settings, attempts: int) -> float:
    """Seconds before the next try: doubling from FORWARD_BACKOFF_START up to FORWARD_BACKOFF_MAX, with
    jitter so that a target coming back is not met by every event at once."""
    base = settings.forward_backoff_start * 2 ** min(attempts - 1, 30)
    return min(settings.forward_backoff_max, base) * random.uniform(0.5, 1.0)


# -- operators: counts, retry, replay -------------------------------------------------------------

def stats(now: dt.datetime | None = None) -> list[dict]:
    """Per subscription: its counts by state, the age of its oldest pending event, why it is paused."""
    now = now or utcnow()
    counts: dict[tuple[int, str], int] = {}
    for subscription_id, state, count in (Delivery.select(Delivery.subscription, Delivery.state, fn.COUNT(Delivery.id))
                                          .group_by(Delivery.subscription, Delivery.state).tuples()):
        counts[subscription_id, state] = count
    oldest = dict(Delivery.select(Delivery.subscription, earliest(Delivery.created_at))
                  .where(Delivery.state == PENDING).group_by(Delivery.subscription).tuples())
    out = []
    for s in Subscription.select().order_by(Subscription.id):
        out.append({
            "id": s.id, "url": s.url, "events": sorted(subscription_events(s)),
            "pending": counts.get((s.id, PENDING), 0), "delivered": counts.get((s.id, DELIVERED), 0),
            "dead": counts.get((s.id, DEAD), 0),
            "oldest_pending_seconds": (now - oldest[s.id]).total_seconds() if oldest.get(s.id) else None,
            "paused": s.paused_at is not None, "disabled": s.disabled_at is not None,
            "paused_reason": s.paused_reason,
        })
    return out


def retry_dead(ids=None, subscription=None, since=None, until=None) -> int:
    """Dead deliveries (all, or those chosen) pending again, due now, with a fresh FORWARD_MAX_AGE."""
    return _requeue(DEAD, ids=ids, subscription=subscription, since=since, until=until)


def replay(subscription=None, since=None, until=None, message_ids=None, ids=None) -> int:
    """Send delivered events again, with their own event ids: a target that deduplicates by webhook-id
    sees each once; one that does not gets them again (what a replay is for)."""
    return _requeue(DELIVERED, ids=ids, subscription=subscription, since=since, until=until,
                    message_ids=message_ids)


def _requeue(state: str, ids=None, subscription=None, since=None, until=None, message_ids=None) -> int:
    """`state` deliveries, chosen by id, subscription, event time [since, until) or message, pending again."""
    now = utcnow()
    query = Delivery.update(state=PENDING, next_attempt_at=now, queued_at=now, lease_owner=None,
                            lease_until=None).where(Delivery.state == state)
    if ids is not None:
        query = query.where(Delivery.id.in_(list(ids)))
    if subscription is not None:
        query = query.where(Delivery.subscription == subscription)
    if since is not None:
        query = query.where(Delivery.created_at >= since)
    if until is not None:
        query = query.where(Delivery.created_at < until)
    if message_ids is not None:
        query = query.where(Delivery.message_id.in_(list(message_ids)))
    with write_transaction():
        return query.execute()


# -- the worker's thread --------------------------------------------------------------------------

class Forwarder(threading.Thread):
    """Delivers in a thread of the worker process, so that a slow or dead target never holds up
    enrichment: its own database connection, its own pace (FORWARD_POLL_INTERVAL when idle)."""

    def __init__(self, settings):
        super().__init__(name="forwarder", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()

    def run(self) -> None:
        db.connect(reuse_if_open=True)
        try:
            while not self.stopping.is_set():
                done = 0
                try:
                    done = deliver_due(self.settings)
                except Exception:   # noqa: BLE001 -- the thread must outlive any one failure
                    log.exception("forwarding pass failed; trying again shortly")
                    _reconnect()
                    self.stopping.wait(self.settings.forward_poll_interval * 5)
                if not done:
                    self.stopping.wait(self.settings.forward_poll_interval)
        finally:
            if not db.is_closed():
                db.close()

    def stop(self, timeout: float | None = None) -> None:
        self.stopping.set()
        self.join(timeout)


def _reconnect() -> None:
    try:
        if not db.is_closed():
            db.close()
        db.connect()
    except Exception:   # noqa: BLE001 -- the next pass tries again
        log.debug("reconnect failed", exc_info=True)
