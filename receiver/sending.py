"""Sending a mailing through TWIN: the durable record of a send, the send loop, and who runs it.

`Send` is one mailing, `Outbox` one row per destination (the input is checked first, by destinations.py).
Rules: rows are marked `in_flight` and committed BEFORE the TWIN call, and TWIN's answer is kept in
`answer` before they become `sent`; a row TWIN may have taken (`unknown`) is never sent again unless
asked (resend_unknown), a `refused` one never. Only the holder of the send's lease moves rows into
`in_flight`; a request that queues more (`accept`) needs none: it only moves rows into `pending`.
Row states, the mailing key, reruns and who sends what: docs/sending.md.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from peewee import Case, fn

from .auth import current_callback_url
from .callbudget import CallBudget
from .db import db, utcnow, write_transaction
from .destinations import ChatSettings, Destination, chat_settings, destination_item, phone_of_key
from .health import count_twin_call
from .models import Message, Outbox, Send
from .status import forward_update, new_message_fields
from .twin24 import SendNotTaken, SendOutcomeUnknown, SendRejected, TwinAuthError, TwinClient

log = logging.getLogger(__name__)

# Outbox row states.
PENDING = "pending"
IN_FLIGHT = "in_flight"
SENT = "sent"
REFUSED = "refused"
REJECTED = "rejected"
NOT_TAKEN = "not_taken"
UNKNOWN = "unknown"
STATES = (PENDING, IN_FLIGHT, SENT, REFUSED, REJECTED, NOT_TAKEN, UNKNOWN)
SENDABLE = (PENDING, NOT_TAKEN, REJECTED)      # provably not taken by TWIN: safe to send (again)
MAX_REFUSALS_SHOWN = 10                         # in the CLI summary; the API lists every row
# Where a send stands for GET /api/sends/<id>: waiting for a worker, being sent, or nothing more will go
# out without a new request (`failure` says why a run stopped).
QUEUED, SENDING, DONE = "queued", "sending", "done"

# ------------------------------------------------------------------------------------------ sending
class SendInProgress(RuntimeError):
    """Another process is sending this mailing right now."""

    def __init__(self, send_id: int, until: dt.datetime | None):
        self.send_id, self.until = send_id, until
        when = f" (its claim runs until {until:%Y-%m-%d %H:%M:%S} UTC)" if until else ""
        super().__init__(f"send #{send_id} is already being sent by another process{when}")


@dataclass
class RowOutcome:
    index: int
    line: int
    phone: str | None             # None: addressed by messengerUserId alone
    state: str
    message_id: str | None = None
    error: str | None = None
    batch: int | None = None
    earlier: bool | None = False  # its state comes from an earlier run (not this one); None: no run
    messenger_user_id: str | None = None
    external_id: str | None = None

    @classmethod
    def of(cls, index: int, line: int, row: Outbox | None, destination: Destination | None = None,
           state: str | None = None, earlier: bool | None = False) -> RowOutcome:
        """A destination's outcome from its outbox row (None: not recorded yet) and/or its input."""
        source = destination if destination is not None else row
        phone = destination.phone if destination is not None else phone_of_key(row.phone)
        return cls(index, line, phone, state or row.state, row.message_id if row else None,
                   row.error if row else None, row.batch if row else None, earlier=earlier,
                   messenger_user_id=source.messenger_user_id, external_id=source.external_id)

    @property
    def who(self) -> str:
        """How the summary names the destination: its phone, else its messengerUserId; and externalId."""
        name = self.phone or f"messengerUserId {self.messenger_user_id}"
        return f"{name} (externalId {self.external_id})" if self.external_id else name

    def as_json(self) -> dict:
        row = {"index": self.index, "line": self.line, "phone": self.phone,
               "messengerUserId": self.messenger_user_id, "externalId": self.external_id, "state": self.state,
               "messageId": self.message_id, "error": self.error, "batch": self.batch}
        if self.earlier is not None:
            row["fromEarlierRun"] = self.earlier
        return row


@dataclass
class SendReport:
    send_id: int | None
    key: str
    rows: list[RowOutcome]                       # this run's destinations, in file order
    failure: str | None = None                   # why the run stopped, if it did
    failure_kind: str | None = None              # rejected / not_taken / unknown
    dry_run: bool = False
    resend_unknown: bool = False
    batches_sent: int = 0
    elsewhere: dict[str, int] = field(default_factory=dict)   # rows of the send not in this input
    overlap: dict[int, int] = field(default_factory=dict)     # other send id -> its rows of this input
    status: str | None = None                    # QUEUED / SENDING / DONE (a report of a stored send)
    # A stored send read a page at a time (`progress`): `rows` is one page, `totals` counts every row
    # of the send, `next_cursor` names the page's last row (None on the last page).
    totals: dict[str, int] | None = None
    next_cursor: str | None = None

    def by_state(self, state: str, *, earlier: bool | None = None) -> list[RowOutcome]:
        return [r for r in self.rows if r.state == state and (earlier is None or r.earlier == earlier)]

    @property
    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in STATES if state != IN_FLIGHT}
        if self.totals is not None:
            return {**counts, **self.totals}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    @property
    def complete(self) -> bool:
        if self.totals is not None:
            return all(count == 0 for state, count in self.totals.items() if state != SENT)
        return all(row.state == SENT for row in self.rows)

    def as_json(self) -> dict:
        status = {} if self.status is None else {"status": self.status}
        page = {} if self.totals is None else {"nextCursor": self.next_cursor}
        return {"send": {"id": self.send_id, "key": self.key}, **status, "complete": self.complete,
                "dryRun": self.dry_run, "counts": self.counts, "failure": self.failure,
                "failureKind": self.failure_kind,
                "alreadySentByOtherSends": {str(k): v for k, v in self.overlap.items()},
                "rows": [r.as_json() for r in self.rows], **page}


class Sender:
    """Sends one mailing: records it, sends the rows that may be sent, in batches, and reports."""

    def __init__(self, settings, chat: ChatSettings, *, callback_url: str, client=None,
                 batch_size: int | None = None, resend_unknown: bool = False, source: str | None = None,
                 progress: Callable[[int], None] | None = None):
        self.settings = settings
        self.chat = chat
        self.callback_url = callback_url
        self._client = client
        self.batch_size = batch_size or settings.send_batch_size
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.resend_unknown = resend_unknown
        self.source = source
        self.progress = progress or (lambda n: None)
        self.owner = uuid.uuid4().hex
        timeouts = settings.twin24_connect_timeout + settings.twin24_read_timeout
        # Longer than one send with every retry the client may make; renewed before each batch.
        self.lease = dt.timedelta(seconds=timeouts * (settings.twin24_retries + 2)
                                  + settings.twin24_max_retry_wait * settings.twin24_retries + 60)

    @classmethod
    def for_send(cls, settings, send: Send, client=None) -> Sender:
        """The sender of a send queued by POST /api/sends, with the chat settings that request gave and
        the callback URL of now: a send queued before CALLBACK_TOKEN was rotated goes out with the new one."""
        options = json.loads(send.options) if send.options else {}
        chat = chat_settings({**json.loads(send.chat), **options, "callbackData": send.callback_data},
                             past_ok=True)
        return cls(settings, chat, callback_url=current_callback_url(settings), client=client,
                   batch_size=send.batch_size, source=send.source)

    @property
    def client(self):
        if self._client is None:
            self._client = TwinClient(self.settings, on_call=count_twin_call, pacer=CallBudget.pacer(self.settings))
        return self._client

    # ---- the plan (no writes) --------------------------------------------------------------------
    def plan(self, destinations: list[Destination]) -> SendReport:
        """What a run would do, without writing or sending: rows to send, rows already done."""
        send = Send.get_or_none(Send.key == self.chat.key)
        existing = {} if send is None else {r.phone: r for r in Outbox.select().where(Outbox.send == send.id)}
        rows = []
        for d in destinations:
            row = existing.get(d.key)
            state = row.state if row is not None else PENDING
            if state == IN_FLIGHT:
                state = UNKNOWN
            rows.append(RowOutcome.of(d.index, d.line, row, d, state,
                                      earlier=row is not None and state not in SENDABLE))
        return SendReport(send.id if send else None, self.chat.key, rows, dry_run=True,
                          resend_unknown=self.resend_unknown,
                          overlap=self.overlap(send.id if send else None, destinations))

    def overlap(self, send_id: int | None, destinations: list[Destination]) -> dict[int, int]:
        """Destinations of this input that OTHER sends with the same callbackData already sent (or may
        have): usually the same mailing with its text or chat settings changed half-way. A warning."""
        if self.chat.callback_data is None:
            return {}
        keys = [d.key for d in destinations]
        found: Counter = Counter()
        for start in range(0, len(keys), 500):
            query = (Outbox.select(Outbox.send).join(Send, on=(Outbox.send == Send.id))
                     .where((Send.callback_data == self.chat.callback_data)
                            & (Outbox.state.in_((SENT, UNKNOWN, IN_FLIGHT)))
                            & (Outbox.phone.in_(keys[start:start + 500]))))
            if send_id is not None:
                query = query.where(Send.id != send_id)
            found.update(send for (send,) in query.tuples())
        return dict(found)

    def sendable(self, rows: list) -> list:
        """The rows this run may send: those TWIN provably did not take (and unknown ones if asked)."""
        wanted = SENDABLE + ((UNKNOWN,) if self.resend_unknown else ())
        return [row for row in rows if row.state in wanted]

    # ---- the run (flask send: in this process, now) ----------------------------------------------
    def run(self, destinations: list[Destination]) -> SendReport:
        send = self._send_row()
        self._claim(send)
        try:
            self._recover(send)
            work = self.sendable(self._record(send, destinations))
            report = SendReport(send.id, send.key, [], resend_unknown=self.resend_unknown)
            self._send_rows(send, work, report)
            report.rows = self._outcomes(send, destinations, {row.id for row in work})
            report.elsewhere = self._elsewhere(send, destinations)
            report.overlap = self.overlap(send.id, destinations)
            return report
        finally:
            self._release(send)

    # ---- the request (POST /api/sends: recorded now, sent by the worker) ---------------------------
    def accept(self, destinations: list[Destination]) -> Send:
        """Record the input and queue the send for the worker (`send_pending`); nothing is sent here.

        This input's rows that a rerun would send become `pending` (its `unknown` ones too with
        resend_unknown): the worker sends every pending row of the send. No lease is needed, so a
        request may add to a send the worker is busy with."""
        send = self._send_row()
        again = (NOT_TAKEN, REJECTED) + ((UNKNOWN,) if self.resend_unknown else ())   # never REFUSED
        with write_transaction():
            rows = self._record(send, destinations)
            # Only from those states, checked again by the UPDATE itself: a row that a run took in
            # flight since we read it is never made sendable.
            self._mark([row.id for row in rows if row.state in again], PENDING, only_from=again)
            waiting = Outbox.select().where((Outbox.send == send.id) & (Outbox.state == PENDING)).exists()
            # No callback URL is kept: the worker builds it when the rows go out (Sender.for_send).
            Send.update(queued=Send.queued + (1 if waiting else 0), batch_size=self.batch_size,
                        updated_at=utcnow()).where(Send.id == send.id).execute()
        return Send.get_by_id(send.id)

    # ---- the worker's turn (send_pending) ----------------------------------------------------------
    def send_queued(self, send: Send) -> int:
        """Send every pending row of a queued send (the caller holds its lease); returns how many."""
        self._recover(send)
        # Read before the rows: a request that queues more meanwhile changes `queued`, so it is not
        # cleared below and the next pass sends what that request added.
        queued = Send.select(Send.queued).where(Send.id == send.id).scalar()
        work = list(Outbox.select().where((Outbox.send == send.id) & (Outbox.state == PENDING))
                    .order_by(Outbox.id))
        log.info("send #%s: sending %d pending rows", send.id, len(work))
        report = SendReport(send.id, send.key, [])
        self._send_rows(send, work, report)
        Send.update(queued=0).where((Send.id == send.id) & (Send.queued == queued)).execute()
        if report.failure:
            log.warning("send #%s stopped: %s", send.id, report.failure)
        return len(work)

    def _send_row(self) -> Send:
        """The mailing's row. Its channels.chat and message options are this run's: the delivery options
        (sendAt, ...) are not part of the key, and the latest request's apply to what is still to send."""
        now = utcnow()
        options = self.chat.message_options()
        given = {Send.chat: json.dumps(self.chat.chat_json(), ensure_ascii=False),
                 Send.options: json.dumps(options, ensure_ascii=False) if options else None}
        with db.atomic():
            Send.insert({Send.key: self.chat.key, Send.created_at: now, Send.updated_at: now,
                         Send.source: self.source, Send.callback_data: self.chat.callback_data, Send.total: 0,
                         **given}).on_conflict(conflict_target=[Send.key], update=given).execute()
        return Send.get(Send.key == self.chat.key)

    def _claim(self, send: Send) -> None:
        now = utcnow()
        claimed = (Send.update(lease_owner=self.owner, lease_until=now + self.lease, updated_at=now)
                   .where((Send.id == send.id) & ((Send.lease_until.is_null()) | (Send.lease_until < now)
                                                  | (Send.lease_owner == self.owner)))
                   .execute())
        if not claimed:
            raise SendInProgress(send.id, Send.get_by_id(send.id).lease_until)

    def _renew(self, send: Send) -> None:
        now = utcnow()
        Send.update(lease_until=now + self.lease, updated_at=now).where(
            (Send.id == send.id) & (Send.lease_owner == self.owner)).execute()

    def _release(self, send: Send) -> None:
        try:
            Send.update(lease_owner=None, lease_until=None, updated_at=utcnow()).where(
                (Send.id == send.id) & (Send.lease_owner == self.owner)).execute()
        except Exception:   # the lease expires by itself; never hide the real error behind this one
            log.exception("could not release the claim on send #%s", send.id)

    def _recover(self, send: Send) -> None:
        """Clean up after a run that died (we hold the lease: no run is live). Rows whose answer from
        TWIN was kept get their message ids now; the others left in flight become `unknown`, since
        TWIN may have taken them: never sendable again without resend_unknown."""
        left = list(Outbox.select().where((Outbox.send == send.id) & (Outbox.state == IN_FLIGHT))
                    .order_by(Outbox.id))
        answered = [row for row in left if row.answer]
        if answered:
            log.warning("send #%s: storing the message ids of %d rows from TWIN's kept answer (the run "
                        "that sent them stopped before storing it)", send.id, len(answered))
            self._store_answer(send, answered, [json.loads(row.answer) for row in answered])
        with db.atomic():
            self._mark([row.id for row in left if not row.answer], UNKNOWN, only_from=(IN_FLIGHT,),
                       error="the run sending it stopped while the request was out: TWIN may have taken it")

    def _record(self, send: Send, destinations: list[Destination]) -> list[Outbox]:
        """Record this input's rows (new destinations added; unsent rows refreshed from the input).
        Returns this input's rows in input order."""
        now = utcnow()
        with write_transaction():
            existing = {row.phone: row for row in Outbox.select().where(Outbox.send == send.id)}
            new = []
            for d in destinations:
                row = existing.get(d.key)
                fields = dict(row_index=d.index, line=d.line, messenger_user_id=d.messenger_user_id,
                              external_id=d.external_id,
                              variables=json.dumps(d.variables, ensure_ascii=False) if d.variables else None)
                if row is None:
                    # outbox.phone is the destination's key: its phone, or muid:<messengerUserId>.
                    new.append(dict(send=send.id, phone=d.key, state=PENDING, updated_at=now, **fields))
                elif row.state in SENDABLE + (UNKNOWN,) and any(getattr(row, k) != v for k, v in fields.items()):
                    Outbox.update(updated_at=now, **fields).where(Outbox.id == row.id).execute()
            for start in range(0, len(new), 200):
                # Ignored if there: two requests for one mailing may record the same new row at once.
                Outbox.insert_many(new[start:start + 200]).on_conflict_ignore().execute()
            total = Outbox.select().where(Outbox.send == send.id).count()
            Send.update(total=total, updated_at=now, source=self.source or Send.source).where(
                Send.id == send.id).execute()
        by_key = {row.phone: row for row in Outbox.select().where(Outbox.send == send.id)}
        return [by_key[d.key] for d in destinations]

    def _send_rows(self, send: Send, work: list[Outbox], report: SendReport) -> None:
        """The send loop: `work` in batches, stopping at the first batch that fails. Why it stopped (or
        None) is kept on the send, for GET /api/sends/<id>."""
        for start in range(0, len(work), self.batch_size):
            batch = work[start:start + self.batch_size]
            stopped = self._send_batch(send, batch, report)
            self.progress(len(batch))
            if stopped:
                break
        Send.update(failure=report.failure, failure_kind=report.failure_kind, updated_at=utcnow()).where(
            Send.id == send.id).execute()

    def _send_batch(self, send: Send, batch: list[Outbox], report: SendReport) -> bool:
        """Send one batch; True if the run must stop here."""
        self._renew(send)
        ids = [row.id for row in batch]
        self.client.reserve_call("send")      # a wait for TWIN24_MAX_CALLS_PER_MINUTE comes before "in flight"
        with write_transaction():
            number = (Send.select(Send.batches).where(Send.id == send.id).scalar() or 0) + 1
            Send.update(batches=number, updated_at=utcnow()).where(Send.id == send.id).execute()
            # answer=None: an answer on a row in flight is always the answer to the request now out.
            self._mark(ids, IN_FLIGHT, batch=number, attempts=Outbox.attempts + 1, error=None, answer=None)
        payload = {"messages": [{
            "channels": {"chat": self.chat.chat_json()},
            "callbackUrl": self.callback_url,
            **({"callbackData": self.chat.callback_data} if self.chat.callback_data is not None else {}),
            **self.chat.message_options(),
            "destinations": [_destination_payload(row) for row in batch],
        }]}
        try:
            answer = self.client.send(payload)
        except SendRejected as error:
            self._fail(report, ids, REJECTED, f"TWIN refused the request: {error.detail}")
            return True
        except (SendNotTaken, TwinAuthError) as error:
            self._fail(report, ids, NOT_TAKEN, f"did not reach TWIN: {error.detail}")
            return True
        except SendOutcomeUnknown as error:
            self._fail(report, ids, UNKNOWN, f"outcome unknown, TWIN may have taken it: {error.detail}")
            return True
        except BaseException as error:
            # A bug, Ctrl-C, a failed token fetch...: the request may have gone out.
            self._fail(report, ids, UNKNOWN, f"interrupted while the request was out ({type(error).__name__})")
            raise
        if len(answer) != len(batch):
            self._fail(report, ids, UNKNOWN, f"TWIN answered {len(answer)} items for {len(batch)} "
                                             "destinations: ids cannot be matched to phones")
            return True
        try:
            kept = False
            self._keep_answer(batch, answer)
            kept = True
            self._store_answer(send, batch, answer)
        except BaseException:
            self._log_unstored_answer(send, number, batch, answer, kept)
            raise
        report.batches_sent += 1
        # A refused destination is its own outcome; an item with neither id nor error means TWIN answers
        # in a way we do not understand: stop before sending more into it.
        unknown = sum(answer_outcome(item)[0] == UNKNOWN for item in answer)
        if unknown:
            report.failure, report.failure_kind = (f"TWIN's answer has neither an id nor an error for {unknown} "
                                                   "destinations: TWIN may have taken them", UNKNOWN)
        return bool(unknown)

    @staticmethod
    def _log_unstored_answer(send: Send, number: int, batch: list[Outbox], answer: list[dict],
                             kept: bool) -> None:
        """TWIN took the batch but its answer was not stored. No phone number is logged: the ids are in
        outbox.answer when that small write worked (the next run stores them, see _recover); when it did
        not, this line is the copy of last resort, naming each row by its outbox id (docs/sending.md)."""
        if kept:
            log.warning("send #%s batch %s: TWIN took %d destinations but storing its answer failed; their "
                        "message ids are kept in outbox.answer for the next run", send.id, number, len(batch))
            return
        pairs = " ".join(f"{row.id}={item.get('id')}" for row, item in zip(batch, answer, strict=True))
        log.warning("send #%s batch %s: TWIN took %d destinations but storing its answer failed, even in "
                    "outbox.answer; outbox id=messageId: %s", send.id, number, len(batch), pairs)

    def _fail(self, report: SendReport, ids: list[int], state: str, reason: str) -> None:
        report.failure, report.failure_kind = reason, state
        try:
            with db.atomic():
                self._mark(ids, state, error=reason[:2000])
        except Exception:
            # Rows stay in_flight; the next run turns them into `unknown` (never into sendable).
            log.exception("could not record the outcome of a batch (%s)", state)
            raise

    @staticmethod
    def _mark(ids: list[int], state: str, only_from: tuple[str, ...] | None = None, **extra) -> None:
        for start in range(0, len(ids), 500):
            where = Outbox.id.in_(ids[start:start + 500])
            if only_from is not None:
                where &= Outbox.state.in_(only_from)
            Outbox.update(state=state, updated_at=utcnow(), **extra).where(where).execute()

    @staticmethod
    def _keep_answer(batch: list[Outbox], answer: list[dict]) -> None:
        """TWIN took the batch: keep each row's item of its answer first, in a small write of its own,
        so that no message id is lost if the bigger update below fails (the next run stores them)."""
        items = [(row.id, json.dumps(item, ensure_ascii=False)) for row, item in zip(batch, answer, strict=True)]
        with db.atomic():
            for start in range(0, len(items), 200):
                chunk = items[start:start + 200]
                Outbox.update(answer=Case(Outbox.id, chunk)).where(
                    Outbox.id.in_([row_id for row_id, _ in chunk])).execute()

    def _store_answer(self, send: Send, batch: list[Outbox], answer: list[dict]) -> None:
        """Rows sent with their ids, or refused (by position: TWIN answers in destination order), and
        the message rows of those sent."""
        now = utcnow()
        with db.atomic():
            for row, item in zip(batch, answer, strict=True):
                state, message_id, error = answer_outcome(item)
                Outbox.update(state=state, message_id=message_id, updated_at=now, error=error).where(
                    Outbox.id == row.id).execute()
                if state == SENT:
                    self._upsert_message(send, row, item, message_id, now)

    def _upsert_message(self, send, row: Outbox, item: dict, message_id: str, now) -> None:
        status = item.get("status") if isinstance(item.get("status"), str) and item.get("status") else "CREATED"
        status = status.upper()[:64]
        ours = {"phone": phone_of_key(row.phone), "messenger_user_id": row.messenger_user_id,
                "variables": row.variables,
                "destination_index": row.row_index, "send_id": send.id, "sent_at": now}
        identity = {"callback_data": self.chat.callback_data, "bulk_id": _id_text(item.get("bulkId")),
                    "group_id": _id_text(item.get("groupId")), "flow_id": _id_text(item.get("flowId"))}
        # A callback may have raced ahead of this answer: then the row exists, and only moves forward.
        update = forward_update(status, None, now, self.settings)
        update.update({getattr(Message, name): value for name, value in ours.items()})
        update.update({getattr(Message, name): fn.COALESCE(getattr(Message, name), value)
                       for name, value in identity.items() if value is not None})
        Message.insert(id=message_id, **ours, **identity,
                       **new_message_fields(status, None, now, self.settings),
                       ).on_conflict(conflict_target=[Message.id], update=update).execute()

    def _outcomes(self, send: Send, destinations: list[Destination], touched: set[int]) -> list[RowOutcome]:
        by_key = {row.phone: row for row in Outbox.select().where(Outbox.send == send.id)}
        return [RowOutcome.of(d.index, d.line, by_key[d.key], d, earlier=by_key[d.key].id not in touched)
                for d in destinations]

    def _elsewhere(self, send: Send, destinations: list[Destination]) -> dict[str, int]:
        """Rows of this mailing recorded by earlier runs that are not in this input, by state."""
        keys = {d.key for d in destinations}
        counts: dict[str, int] = {}
        for key, state in Outbox.select(Outbox.phone, Outbox.state).where(Outbox.send == send.id).tuples():
            if key not in keys:
                counts[state] = counts.get(state, 0) + 1
        return counts


def send_pending(settings, client=None) -> int:
    """The worker's part of POST /api/sends: claim one queued send and send its pending rows.

    Returns how many rows it took in hand (0: nothing queued, or every queued send is being sent by
    another process). The claim is the send's lease, as for `flask send`: two workers never send one
    mailing at once, and a killed worker's claim expires, after which the next claim turns its rows
    left in flight into `unknown` (never resent). `client` is a TwinClient (one is made if None)."""
    now = utcnow()
    queued = list(Send.select().where((Send.queued > 0) & (Send.lease_until.is_null() | (Send.lease_until < now)))
                  .order_by(Send.id).limit(20))
    for send in queued:
        sender = Sender.for_send(settings, send, client)
        try:
            sender._claim(send)
        except SendInProgress:
            continue                     # another worker was quicker
        try:
            return sender.send_queued(send)
        finally:
            sender._release(send)
    return 0


def progress(send_id: int, limit: int, after: int = 0) -> SendReport | None:
    """Where a stored send stands (GET /api/sends/<id>): whether it is being sent, how many of its rows
    are in each state, and one page of its rows in the order recorded: at most `limit` rows after the
    outbox row `after` (a page's next_cursor)."""
    send = Send.get_or_none(Send.id == send_id)
    if send is None:
        return None
    page = list(Outbox.select().where((Outbox.send == send.id) & (Outbox.id > after))
                .order_by(Outbox.id).limit(limit + 1))
    next_cursor = str(page[limit - 1].id) if len(page) > limit else None
    rows = [RowOutcome.of(r.row_index, r.line, r, earlier=None) for r in page[:limit]]
    totals = dict(Outbox.select(Outbox.state, fn.COUNT(Outbox.id)).where(Outbox.send == send.id)
                  .group_by(Outbox.state).tuples())
    if send.lease_until is not None and send.lease_until > utcnow():
        status = SENDING
    else:
        status = QUEUED if send.queued else DONE
    return SendReport(send.id, send.key, rows, failure=send.failure, failure_kind=send.failure_kind,
                      status=status, totals=totals, next_cursor=next_cursor)


def _destination_payload(row: Outbox) -> dict:
    """The destination as recorded in the outbox, so a rerun sends exactly what was checked."""
    return destination_item(phone_of_key(row.phone), row.messenger_user_id,
                            json.loads(row.variables) if row.variables else None, row.external_id)


def answer_outcome(item: dict) -> tuple[str, str | None, str | None]:
    """(state, message id, error) of one destination from its item of TWIN's send answer: `sent` with
    an id; `refused` with no id and an error; `unknown` with neither (we cannot tell)."""
    message_id = item.get("id")
    error = refusal_text(item.get("error"))
    if isinstance(message_id, str) and message_id:
        return SENT, message_id, error
    if error:
        return REFUSED, None, error
    return UNKNOWN, None, "TWIN's answer has no id and no error for this destination"


def refusal_text(error) -> str | None:
    """TWIN's reason in a send answer item: the text, or the `message` of an error object (its file,
    line and trace are TWIN's internals: they stay in outbox.answer only)."""
    if error in (None, "", {}, []):
        return None
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message.strip():
            return message.strip()[:2000]
        error = {k: v for k, v in error.items() if k not in ("file", "line", "trace")} or "no message"
    text = error if isinstance(error, str) else json.dumps(error, ensure_ascii=False)
    return text[:2000]


def _id_text(value) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return json.dumps(value)
    return value[:128] if isinstance(value, str) and value else None


# ------------------------------------------------------------------------------------------ reports
def line_ranges(lines: Iterable[int]) -> str:
    """'2-5, 9, 11-12' for [2, 3, 4, 5, 9, 11, 12]."""
    parts: list[str] = []
    ordered = sorted(set(lines))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(parts)


def summary_lines(report: SendReport, noun: str = "lines") -> list[str]:
    """The human summary of a run (the CLI prints it): a title, then a line per group of rows."""
    return _title_lines(report) + (_plan_lines(report, noun) if report.dry_run else _outcome_lines(report, noun))


def _title_lines(report: SendReport) -> list[str]:
    """Which send (or dry run) this is, and a warning per other send that reached the same destinations."""
    title = "dry run" if report.dry_run else f"send #{report.send_id}"
    return [f"{title}: {len(report.rows)} destinations, mailing key {report.key[:12]}"] + [
        f"  warning: {count} of these destinations were already sent by send #{other}, which has "
        "the same callbackData but other chat settings (text?)" for other, count in sorted(report.overlap.items())]


def _group(label: str, rows: list[RowOutcome], noun: str, note: str = "") -> list[str]:
    """A line counting `rows` and naming their lines (none when there are no rows)."""
    if not rows:
        return []
    return [f"  {label:<22}{len(rows):>7}  ({noun} {line_ranges(r.line for r in rows)}){note}"]


def _plan_lines(report: SendReport, noun: str) -> list[str]:
    """What a dry run would do with the rows."""
    unknown_note = "  would be resent (--resend-unknown)" if report.resend_unknown else "  not resent"
    return (_group("would be sent:", [r for r in report.rows if r.state in SENDABLE], noun)
            + _group("already sent:", report.by_state(SENT), noun)
            + _group("refused by TWIN:", report.by_state(REFUSED), noun, "  not resent")
            + _group("unknown outcome:", report.by_state(UNKNOWN), noun, unknown_note))


def _outcome_lines(report: SendReport, noun: str) -> list[str]:
    """What a run did with the rows, the refusals and rejection reasons under their groups."""
    refused, rejected = report.by_state(REFUSED), report.by_state(REJECTED)
    return (_group("sent now:", report.by_state(SENT, earlier=False), noun)
            + _group("sent earlier:", report.by_state(SENT, earlier=True), noun, "  not sent again")
            + _group("refused by TWIN:", refused, noun, "  this destination only; never resent")
            + _refusal_lines(report, refused, noun)
            + _group("rejected by TWIN:", rejected, noun, "  safe to fix and rerun")
            + [f"      reason: {reason}" for reason in sorted({r.error or "" for r in rejected})[:5]]
            + _group("unknown outcome:", report.by_state(UNKNOWN), noun,
                     "  TWIN may have taken them: NOT resent (see docs/sending.md)")
            + _group("not sent:", report.by_state(NOT_TAKEN) + report.by_state(PENDING), noun, "  a rerun sends them")
            + _ending_lines(report))


def _refusal_lines(report: SendReport, refused: list[RowOutcome], noun: str) -> list[str]:
    """TWIN's reason for each refused row, the first MAX_REFUSALS_SHOWN of them."""
    lines = [f"      {noun[:-1]} {row.line}, {row.who}: {row.error}" for row in refused[:MAX_REFUSALS_SHOWN]]
    if len(refused) > MAX_REFUSALS_SHOWN:
        lines.append(f"      ... and {len(refused) - MAX_REFUSALS_SHOWN} more: the `outbox` rows of send "
                     f"#{report.send_id} in state '{REFUSED}'")
    return lines


def _ending_lines(report: SendReport) -> list[str]:
    """Why the run stopped, if it did, and the rows of earlier runs this input left out."""
    lines = [f"  stopped: {report.failure}"] if report.failure else []
    if report.elsewhere:
        parts = ", ".join(f"{n} {state}" for state, n in sorted(report.elsewhere.items()))
        lines.append(f"  rows of earlier runs not in this input (left as they are): {parts}")
    return lines
