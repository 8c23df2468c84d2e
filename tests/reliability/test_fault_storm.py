"""The worker killed mid-batch, again and again, while TWIN misbehaves in every way at once.

The mailing goes through the receiver, as in production: POST /api/sends to the live receiver records
it and answers 202, and the worker process (`python -m receiver worker`) sends it, then enriches what
was delivered. The worker is killed with SIGKILL and restarted all along, each time it is caught
mid-batch: while it sends (the moment GET /api/sends/<id> shows rows of a new batch in flight, i.e.
with a request to TWIN out or its answer not yet stored), and in the middle of enrichment sweeps
(messages under its lease).

The storm, from before the first request: 20% random 5xx, a rate limit low enough that sends and
sweeps run into 429 bursts, stalled answers that outlast the read timeout, pages of 10 items, and
access tokens that live 2 seconds (the worker logs in with TWIN24_LOGIN and TWIN24_PASSWORD, so it
must refresh or log in again all the time). On top of the random faults, two sends fail in a known
way, so that both kinds of unknown outcome happen in every run: one is answered 503 without TWIN
taking it, one is taken but its answer stalls past the read timeout.

Scaling of the stalls: production TWIN stalls of ~10 s against a 60 s read timeout only cost time; what
tests the client is a stall that outlasts the read timeout. Here the read timeout is 1 s and the
stalls 1.5 s, which exercises the same path (timeout, retry, backoff) in a fraction of the time.

The kills start only once the stalled send is over, so that its rows are always left `unknown` by a
live worker (were they sent again, by the worker or by the client's retries, their phones would get
two messages), and each kill is checked to have caught a batch the test has not killed before.

Like a user would, the test POSTs the same mailing again (without resendUnknown) whenever the worker
stopped at a failed batch, until no row is left to send. At the end:

* by the simulator's ground truth, grouped by phone: no phone of the list got two messages; every row
  `sent` got exactly one, the one whose id the receiver reports; every other row is `unknown` (with
  20% 5xx and stalls on every request, and the kills, that is a third to a half of the rows);
* a row once reported `unknown` by GET /api/sends/<id> stays `unknown` with no message id in every
  later report (never resent); a row in flight at a kill ends `unknown` or `sent`, in the batch it
  was in; TWIN did take some unknown rows (a resend would have doubled them), and refused others;
* the receiver's `results` view links every sent phone to its message id, and holds the messages of
  unknown rows that TWIN took without a phone (nothing ties them to one: docs/sending.md);
* every message ends with the simulator's final status, chat id and result; none is given up.
"""
from __future__ import annotations

import datetime as dt
import random
import signal
import time
from collections import Counter

import pytest
import requests

from receiver import create_app
from receiver.db import db, utcnow
from receiver.models import Message, Send
from receiver.simulator import SimConfig, Simulator

from ..support import (
    FAST_TWIN,
    SEND_TOKEN,
    LiveServer,
    assert_matches_truth,
    kill_if_running,
    phones,
    settings_env,
    settings_for,
    start_worker,
    stop_worker,
)

PHONES = phones(80)
CHAT = {"chatId": "chat-channel-1", "botId": "bot-1", "messengerType": "WHATSAPP",
        "chatSessionName": "Опрос", "text": "Здравствуйте!", "provider": "TWIN"}
BODY = {"chat": CHAT, "callbackData": "storm-1", "batchSize": 2,
        "destinations": [{"phone": phone, "variables": {"n": str(n)}} for n, phone in enumerate(PHONES)]}
STORM = dict(error_rate=0.2, rate_limit=4, slow_rate=0.1, slow_seconds=1.5, page_cap=10,
             # The 2nd send TWIN gets past its gateway is taken but answered only after the read
             # timeout (no kill before it is over: see `armed`); the 4th is a 503 that took nothing.
             drop_after_accept_sends=[1], drop_sleep=1.5, fail_sends=[3])
SENDABLE = ("pending", "not_taken", "rejected")     # what a rerun sends (unknown is not among them)
SEND_KILLS = 4          # kills while rows are in flight
ENRICH_KILLS = 3        # kills while messages are still being enriched
# Quiet for this long = over: longer than a stall, after which TWIN may still take a send.
QUIET = 2.0
ENRICH_LEASE = 3.0      # seconds (ENRICH_LEASE of the workers)
KILLED_IN_FLIGHT = "the run sending it stopped while the request was out"
TIMED_OUT = "read timeout"



def kill(worker) -> None:
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    # The dead worker's claim on the send would hold for its full length (over a minute with these
    # timeouts: longer than one send with all its retries). Nobody else is sending: let it run out now,
    # as if that time had passed. Rows it left in flight are then the next worker's to clean up.
    Send.update(lease_until=utcnow() - dt.timedelta(seconds=1)).where(
        Send.lease_until.is_null(False)).execute()


def sweeping(last_kill: float) -> bool:
    """A live worker is in the middle of a sweep: messages are under a lease taken since the last kill
    (a dead worker's leases end at most ENRICH_LEASE after it died)."""
    since = utcnow() - dt.timedelta(seconds=time.monotonic() - last_kill - ENRICH_LEASE)
    return Message.select().where(Message.lease_until > since).exists()


def stalled_send_over(twin, mailing) -> bool:
    """TWIN has taken the stalled send, and no row of it is in flight any more."""
    stalled = {item["phone"] for item in twin.truth()
               if item["sendIndex"] in STORM["drop_after_accept_sends"]}
    in_flight = {row["phone"] for row in mailing.report["rows"] if row["state"] == "in_flight"}
    return bool(stalled) and not stalled & in_flight


def all_settled():
    return Message.select().where(Message.stage.not_in(["done", "given_up"])).count() == 0


class Mailing:
    """The mailing as a user of the API sees it: POSTed, followed, POSTed again when a run stopped.

    Every report read is checked: a row once `unknown` stays `unknown`, with no message id."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {SEND_TOKEN}"      # sends, and follows them
        self.url = None
        self.posts = 0
        self.unknown: set[str] = set()       # phones ever reported unknown
        self.report: dict = {}

    def post(self) -> None:
        answer = self.http.post(f"{self.base_url}/api/sends", json=BODY, timeout=30)
        assert answer.status_code == 202, answer.text
        assert answer.headers["Location"] == answer.json()["url"]
        self.url = answer.json()["url"]
        self.posts += 1
        self._observe(answer.json())

    def poll(self) -> dict:
        answer = self.http.get(f"{self.base_url}{self.url}", timeout=30)
        assert answer.status_code == 200, answer.text
        self._observe(answer.json())
        return self.report

    def drive(self) -> dict:
        """Poll; if the worker is done with the send but rows are left to send, ask again."""
        report = self.poll()
        if report["status"] == "done" and any(report["counts"].get(state) for state in SENDABLE):
            self.post()
        return self.report

    def finished(self) -> bool:
        report = self.report
        return report["status"] == "done" and not any(
            report["counts"].get(state) for state in (*SENDABLE, "in_flight"))

    def in_flight(self) -> dict[str, int]:
        """phone -> batch of the rows in flight."""
        return {row["phone"]: row["batch"] for row in self.report["rows"] if row["state"] == "in_flight"}

    def _observe(self, report: dict) -> None:
        rows = {row["phone"]: row for row in report["rows"]}
        assert sorted(rows) == PHONES, "the send's rows are not the list's phones"
        for phone in self.unknown:
            assert rows[phone]["state"] == "unknown" and rows[phone]["messageId"] is None, \
                f"{phone} was unknown and then resent: {rows[phone]}"
        self.unknown |= {phone for phone, row in rows.items() if row["state"] == "unknown"}
        self.report = report


@pytest.fixture
def storm_twin():
    with Simulator(SimConfig(seed=29, token_ttl=2.0, **FAST_TWIN)).start() as simulator:
        yield simulator


def test_worker_killed_repeatedly_in_a_fault_storm_sends_once_and_ends_correct(database_url, storm_twin,
                                                                                tmp_path):
    twin = storm_twin
    # The receiver over HTTP; its settings need its URL (the callback URL of the mailing), its server
    # needs the app: the server dispatches to the app made once the URL is known.
    apps = []
    server = LiveServer(lambda environ, start_response: apps[0](environ, start_response))
    settings = settings_for(
        twin, database_url, auth="login", public_url=server.url,
        twin24_connect_timeout=1.0, twin24_read_timeout=1.0, twin24_retries=5, twin24_max_retry_wait=1.0)
    apps.append(create_app(settings))
    server.start()
    db.connect(reuse_if_open=True)
    log_path = tmp_path / "worker.log"
    # No call ceiling: 2 s tokens and retried 5xx/429 want far more than TWIN24_MAX_CALLS_PER_MINUTE's
    # default, and waiting out the minute is not what this test is about (test_callbudget is).
    env = settings_env(settings) | {"ENRICH_LEASE": str(ENRICH_LEASE), "ENRICH_POLL_INTERVAL": "0.1",
                                    "TWIN24_MAX_CALLS_PER_MINUTE": "0"}
    rng = random.Random(7)
    mailing = Mailing(server.url)
    worker = None
    try:
        twin.configure(**STORM)
        worker = start_worker(env, log_path)
        mailing.post()
        assert mailing.report["status"] == "queued" and mailing.report["counts"]["pending"] == len(PHONES)

        # The worker killed (and restarted at once) the moment it is caught mid-batch: SEND_KILLS times
        # with rows in flight (a request to TWIN out, or its answer not yet stored), ENRICH_KILLS times
        # in the middle of a sweep (messages under its lease), at least a random second or so apart.
        # Meanwhile the mailing is POSTed again whenever a run stopped at a failed batch.
        send_kills = enrich_kills = 0
        armed = False
        killed_rows: dict[str, int] = {}            # phone -> batch, of the rows in flight at a kill
        killed_batches: set[int] = set()
        last_kill = time.monotonic()
        gap = rng.uniform(0.5, 1.5)
        deadline = time.monotonic() + 75
        quiet_since = None          # since when nothing is left to send, enrich or call back
        while quiet_since is None or time.monotonic() - quiet_since < QUIET:
            assert time.monotonic() < deadline, (
                f"kills {send_kills} sending, {enrich_kills} enriching", mailing.report["counts"],
                Counter(m.stage for m in Message.select()), log_path.read_text(errors="replace")[-3000:])
            mailing.drive()
            if not (mailing.finished() and all_settled() and twin.idle()):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            # No kill before a live worker is through with the send TWIN took but answered too late
            # (drop_after_accept_sends): a worker or client that sent such rows again would give their
            # phones a second message. Rows a killed worker left in flight stay so until the next one
            # claims the send: only batches sent since the last kill count.
            armed = armed or stalled_send_over(twin, mailing)
            if armed and send_kills < SEND_KILLS and set(mailing.in_flight().values()) - killed_batches:
                send_kills += 1
                killed_rows |= mailing.in_flight()
                killed_batches |= set(killed_rows.values())
            elif armed and enrich_kills < ENRICH_KILLS and time.monotonic() - last_kill > gap \
                    and sweeping(last_kill):
                enrich_kills += 1
            else:
                time.sleep(rng.uniform(0.02, 0.1))
                continue
            kill(worker)
            worker = start_worker(env, log_path)
            last_kill = time.monotonic()
            gap = rng.uniform(0.5, 1.5)
        stop_worker(worker)
        assert (send_kills, enrich_kills) == (SEND_KILLS, ENRICH_KILLS), \
            f"only {send_kills} kills while rows were in flight, {enrich_kills} in the middle of a sweep"

        # The send, as GET /api/sends/<id> reports it: every row sent or unknown, nothing left to do.
        report = mailing.poll()
        rows = {row["phone"]: row for row in report["rows"]}
        states = Counter(row["state"] for row in rows.values())
        assert set(states) <= {"sent", "unknown"}, states
        unknown = {phone for phone, row in rows.items() if row["state"] == "unknown"}
        assert unknown == mailing.unknown           # and none of them ever left `unknown` (Mailing checks)
        # A row the worker was killed with ends `unknown` (TWIN may have taken it), or `sent` in that
        # same batch if TWIN's answer had come and been kept before the kill: never sent again.
        killed = [rows[phone] for phone in killed_rows]
        for row in killed:
            assert row["state"] in ("unknown", "sent") and row["batch"] == killed_rows[row["phone"]], \
                f"in flight in batch {killed_rows[row['phone']]} at a kill, then: {row}"
        assert any(KILLED_IN_FLIGHT in (row["error"] or "") for row in killed), \
            f"no kill landed while a request was out: {killed}"

        # TWIN's ground truth, grouped by phone: nobody got the message twice.
        truth = twin.truth()
        per_phone = Counter(item["phone"] for item in truth)
        assert set(per_phone) <= set(PHONES), set(per_phone) - set(PHONES)
        twice = {phone: n for phone, n in per_phone.items() if n > 1}
        assert not twice, f"sent more than once: {twice}"
        id_of = {item["phone"]: item["id"] for item in truth}
        for phone, row in rows.items():
            if row["state"] == "sent":
                assert per_phone[phone] == 1 and row["messageId"] == id_of[phone], (phone, row)
        taken_unknown = unknown & set(id_of)         # TWIN took them; we never learnt their ids
        assert any(TIMED_OUT in (rows[phone]["error"] or "") for phone in taken_unknown), \
            "no send TWIN took timed out in a live worker: a resend could not have shown"
        assert unknown - set(id_of), "every unknown row was taken by TWIN: the 503 case did not happen"

        # The receiver's results view: a sent phone is linked to its id; the messages of unknown rows
        # that TWIN took are there too (their callbacks came), with no phone.
        linked = dict(db.execute_sql("SELECT message_id, phone FROM results").fetchall())
        assert set(linked) == {item["id"] for item in truth}
        for phone, message_id in id_of.items():
            assert linked[message_id] == (None if phone in unknown else phone), (phone, message_id)

        # Every message ends as TWIN has it: final status, chat id, result.
        assert_matches_truth(twin, {m.id: m for m in Message.select()}, [item["id"] for item in truth])
        assert Message.select().where(Message.stage == "given_up").count() == 0

        # The storm did happen: 429 bursts, random 5xx (besides the 503 of fail_sends), tokens renewed
        # over and over (by refresh, by a new login, or after a 401).
        calls = twin.calls()
        outcomes = Counter()
        for endpoint in ("send", "messages_stats", "sessions_stats"):
            outcomes.update(calls.get(endpoint, {}))
        assert outcomes["429"] and outcomes["500"] + outcomes["502"], calls
        assert calls["send"].get("503", 0) >= 1 and calls["send"].get("200", 0) >= 2, calls["send"]
        assert sum(calls.get("login", {}).values()) + sum(calls.get("refresh", {}).values()) > 3, calls
        print(f"\nfault storm ({database_url.split(':')[0]}): {mailing.posts} POSTs, kills {send_kills} "
              f"sending + {enrich_kills} enriching; rows {dict(states)}, unknown taken by TWIN "
              f"{len(taken_unknown)}; TWIN calls {calls}")
    finally:
        kill_if_running(worker)
        server.stop()
        if not db.is_closed():
            db.close()
