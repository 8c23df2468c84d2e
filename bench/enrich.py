"""Enrichment: how fresh the chat ids and results are, and what that costs in TWIN calls.

    python -m bench enrich [--only big,small,storm] [--messages 10000] [--small 200] ...

Runs the real thing on this machine for each case: the TWIN simulator (in this process), the receiver
under gunicorn with deploy/gunicorn.conf.py on a fresh SQLite file, and the enrichment worker as its
own process, with the production settings (horizons shortened so that a run ends).

    big    one mailing of 10,000 destinations over a TWIN whose bot answers within 40 s; then a late
           mailing of 20 while the first one's messages still sit in the statistics window
    small  200 messages over four callbackData values, a TWIN whose statistics lag 3 s behind the
           callbacks, that repeats callbacks and sends them out of order, lists statistics in no
           order among other people's chats, and whose bot answers within 90 s
    storm  the same small mailing, with 5xx (20 % of calls), a 1 call/s rate limit per endpoint
           (429), and 10 % of answers stalled 5 s

The lag of a message is the time from the moment the simulator's statistics could first have given
the fact (its own record: `chatIdVisibleAt`, `resultVisibleAt` in the ground truth) to the moment the
receiver's row held it (`chat_id_at`, `result_at`). Calls are those the receiver made (auth and
statistics; the benchmark's own sends are not), with the peak in any sliding 60 s.

Targets (issue 16): small mailing median <= 5 s, p90 <= 15 s, max <= 60 s; big mailing <= 5 calls
per 1,000 delivered; never more than TWIN24_MAX_CALLS_PER_MINUTE in a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

from receiver.demo import GUNICORN_CONF, free_port, start_process, stop_processes, wait_healthy
from receiver.settings import Settings
from receiver.simulator import SimConfig, Simulator, most_calls_within
from receiver.status import FAILED_STATUSES

CALLBACK_TOKEN = "bench-callback-token-0123456789"
API_TOKEN = "bench-api-token-0123456789abcdef"
RECEIVER_CALLS = ("login", "refresh", "messages_stats", "sessions_stats")

BIG_TWIN = dict(seed=2024, pending_after=(0.2, 2.0), final_after=(0.5, 8.0), undelivered_rate=0.05,
                stats_lag=0.0, result_after=(3.0, 40.0), no_reply_rate=0.2, session_close_after=45.0,
                callback_workers=8)
SMALL_TWIN = dict(seed=16, pending_after=(0.2, 2.0), final_after=(0.5, 8.0), undelivered_rate=0.05,
                  stats_lag=3.0, result_after=(3.0, 90.0), no_reply_rate=0.2, session_close_after=100.0,
                  duplicate_callbacks=0.3, reorder_callbacks=0.3, shuffle=True, padding_sessions=2)
STORM = dict(error_rate=0.2, rate_limit=1, slow_rate=0.1, slow_seconds=5.0)


@dataclass
class Case:
    name: str
    title: str
    messages: int
    groups: int                   # callbackData values the mailing is spread over
    twin: dict
    late: int = 0                 # a late small mailing after the first one settled
    quirks: dict = field(default_factory=dict)     # switched on once the mailing is sent


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench enrich", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="big,small,storm", help="which cases, comma separated")
    parser.add_argument("--messages", type=int, default=10_000, help="the big mailing")
    parser.add_argument("--small", type=int, default=200, help="the small mailing")
    parser.add_argument("--late", type=int, default=20, help="messages in the late mailing (0: none)")
    # Defaults are the production defaults (receiver/settings.py).
    parser.add_argument("--max-calls", type=int, default=Settings.twin24_max_calls_per_minute,
                        help="TWIN24_MAX_CALLS_PER_MINUTE")
    parser.add_argument("--recheck-share", type=float, default=Settings.enrich_recheck_share,
                        help="ENRICH_RECHECK_SHARE")
    parser.add_argument("--max-wait", type=float, default=Settings.enrich_max_wait, help="ENRICH_MAX_WAIT, s")
    parser.add_argument("--page-cap", type=int, default=1000, help="the simulator's largest page")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up a case after this, s")
    return parser.parse_args(argv)


def cases(args) -> list[Case]:
    every = {
        "big": Case("big", f"one mailing of {args.messages}", args.messages, 1, BIG_TWIN, late=args.late),
        "small": Case("small", f"small mailing of {args.small}, lagging, duplicating, out of order",
                      args.small, 4, SMALL_TWIN),
        "storm": Case("storm", f"small mailing of {args.small}, the same with 5xx, 429 and stalls",
                      args.small, 4, SMALL_TWIN, quirks=STORM),
    }
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)}; choose from {', '.join(every)}")
    return [every[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; TWIN24_MAX_CALLS_PER_MINUTE="
          f"{args.max_calls}, ENRICH_RECHECK_SHARE={args.recheck_share}, ENRICH_MAX_WAIT={args.max_wait}")
    for case in cases(args):
        run_case(case, args)
    return 0


def run_case(case: Case, args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-enrich-{case.name}-"))
    twin = Simulator(SimConfig(**case.twin, page_cap=args.page_cap)).start()
    port = free_port()
    env = receiver_env(twin, workdir, port, args)
    processes = []
    db_path = workdir / "receiver.db"
    try:
        processes = start_receiver(env, workdir, port)
        started = time.monotonic()
        ids = send_mailing(twin, f"http://127.0.0.1:{port}", case.messages, case.groups)
        twin.configure(**case.quirks)
        settled_in = wait_settled(db_path, ids, twin, args.timeout, started)
        print(f"\n{case.name}: {case.title}")
        report(db_path, twin, ids, settled_in, twin.call_times(RECEIVER_CALLS))
        if case.late:
            before = len(twin.call_times(RECEIVER_CALLS))
            late_ids = send_mailing(twin, f"http://127.0.0.1:{port}", case.late, 1, first=case.messages)
            wait_settled(db_path, late_ids, twin, args.timeout, time.monotonic(), quiet=True)
            print(f"  late mailing of {case.late}, sent once the first had settled:")
            report(db_path, twin, late_ids, None, twin.call_times(RECEIVER_CALLS)[before:], brief=True)
    finally:
        stop_processes(processes)
        twin.stop()
    print(f"  (logs and database kept in {workdir})")


def start_receiver(env: dict, workdir: Path, port: int) -> list:
    """Start the web side (gunicorn on `port`) and, once it answers /healthz, the worker, logging to
    web.log and worker.log in `workdir`; their processes, for stop_processes. Stops what it started
    if the start fails."""
    processes = [start_process(["gunicorn", "-c", str(GUNICORN_CONF), "wsgi:app"], env, workdir / "web.log")]
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz")
        processes.append(start_process(["python", "-m", "receiver", "worker"], env, workdir / "worker.log"))
    except BaseException:
        stop_processes(processes)
        raise
    return processes


def receiver_env(twin, workdir: Path, port: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWIN24_", "ENRICH_", "DATABASE_"))}
    env.update({
        "DATABASE_URL": f"sqlite:///{workdir}/receiver.db", "CALLBACK_TOKEN": CALLBACK_TOKEN,
        "API_TOKEN": API_TOKEN, "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_ACCESS_LOG": "",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        "TWIN24_LOGIN": twin.login, "TWIN24_PASSWORD": twin.password,
        "TWIN24_AUTH_URL": twin.auth_url, "TWIN24_NOTIFY_URL": twin.notify_url,
        "TWIN24_ANALYSE_URL": twin.analyse_url,
        "TWIN24_MAX_CALLS_PER_MINUTE": str(args.max_calls), "ENRICH_RECHECK_SHARE": str(args.recheck_share),
        "ENRICH_MAX_WAIT": str(args.max_wait),
        # Shorter than production so that a run ends: the simulator's bot answers within 90 s.
        "ENRICH_RESULT_HORIZON": "150", "ENRICH_CHAT_ID_HORIZON": "150",
    })
    (workdir / "metrics").mkdir()
    return env


def send_mailing(twin, receiver_url: str, count: int, groups: int, first: int = 0) -> list[str]:
    """One send of `count` destinations, split over `groups` message objects, each its own callbackData."""
    chat = {"chatId": "bench-channel", "botId": "bench-bot", "messengerType": "WHATSAPP",
            "chatSessionName": "Опрос", "text": "Здравствуйте!", "provider": "TWIN"}
    phones = [f"7999{n:07d}" for n in range(first, first + count)]
    body = {"messages": [{
        "channels": {"chat": chat}, "callbackUrl": f"{receiver_url}/callbacks/{CALLBACK_TOKEN}",
        "callbackData": f"bench-mailing-{first}-{group}",
        "destinations": [{"phone": phone} for phone in phones[group::groups]],
    } for group in range(groups)]}
    answer = requests.post(f"{twin.notify_url}/messages", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {twin.static_token}"})
    answer.raise_for_status()
    return [item["id"] for item in answer.json()]


def wait_settled(db_path: Path, ids: list[str], twin, timeout: float, started: float,
                 quiet: bool = False) -> float | None:
    """Until every message of `ids` is done, given up, or failed for good (or `timeout` s)."""
    deadline = time.monotonic() + timeout
    last_line = time.monotonic()
    wanted = set(ids)
    while time.monotonic() < deadline:
        rows = read_rows(db_path)
        settled = sum(1 for i in wanted if i in rows and is_settled(rows[i]))
        if not quiet and time.monotonic() - last_line > 15:
            print(f"  {time.monotonic() - started:5.0f} s  {settled} of {len(ids)} settled", flush=True)
            last_line = time.monotonic()
        if settled >= len(ids) and twin.idle():
            return time.monotonic() - started
        time.sleep(1.0)
    return None


def is_settled(row) -> bool:
    return row["stage"] in ("done", "given_up") or (row["stage"] == "none" and row["status"] in FAILED_STATUSES)


def read_rows(db_path: Path) -> dict:
    try:
        with sqlite3.connect(db_path, timeout=30) as connection:
            connection.row_factory = sqlite3.Row
            return {r["id"]: r for r in connection.execute(
                "select id, status, stage, chat_id, result, chat_id_at, result_at from message")}
    except sqlite3.OperationalError:
        return {}


def report(db_path: Path, twin, ids, settled_in, call_times: list[float], brief: bool = False) -> None:
    truth = {t["id"]: t for t in twin.truth()}
    rows = read_rows(db_path)
    delivered = [i for i in ids if truth[i]["finalStatus"] == "DELIVERED"]
    answered = [i for i in delivered if truth[i]["result"] is not None]
    chat_ok = [i for i in delivered if i in rows and rows[i]["chat_id"] == truth[i]["sessionId"]]
    result_ok = [i for i in answered if i in rows and rows[i]["result"]
                 and json.loads(rows[i]["result"]) == truth[i]["result"]]
    chat_lags = lags(rows, truth, chat_ok, "chat_id_at", "chatIdVisibleAt")
    result_lags = lags(rows, truth, result_ok, "result_at", "resultVisibleAt")
    per_thousand = 1000 * len(call_times) / max(len(delivered), 1)
    if not brief:
        print(f"  everything settled in {'(did not settle)' if settled_in is None else f'{settled_in:.0f} s'}")
    print(f"  delivered / with the right chat id   {len(delivered):>6} / {len(chat_ok)}")
    print(f"  answered / with the right result     {len(answered):>6} / {len(result_ok)}")
    print(f"  lag, visible in TWIN -> row holds it: chat id {describe(chat_lags)}")
    print(f"                                        result  {describe(result_lags)}")
    print(f"  TWIN calls (auth + statistics) {len(call_times):>6}   {calls_by_endpoint(twin)}"
          if not brief else f"  TWIN calls meanwhile {len(call_times)}")
    print(f"  calls per 1,000 delivered      {per_thousand:>6.1f}   peak in any 60 s: {most_calls_within(call_times)}")
    if not brief:
        print(f"  answered with an error: {refusals(twin)}")


def lags(rows, truth, ids, held_column: str, visible_key: str) -> list[float]:
    """Seconds from the fact's first visibility in the simulator to the row holding it, per message."""
    return [(as_utc(rows[i][held_column]) - as_utc(truth[i][visible_key])).total_seconds()
            for i in ids if rows[i][held_column] and truth[i][visible_key]]


def as_utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def describe(values: list[float]) -> str:
    if not values:
        return "(none)"
    return (f"median {quantile(values, 50):5.1f} s, p90 {quantile(values, 90):5.1f} s, "
            f"max {max(values):5.1f} s  ({len(values)} messages)")


def calls_by_endpoint(twin) -> dict[str, int]:
    return {name: sum(outcomes.values()) for name, outcomes in twin.calls().items() if name in RECEIVER_CALLS}


def refusals(twin) -> str:
    """How many of the receiver's calls TWIN answered with an error, by status."""
    counted: dict[str, int] = {}
    for name, outcomes in twin.calls().items():
        for outcome, n in outcomes.items():
            if name in RECEIVER_CALLS and not outcome.startswith("2"):
                counted[outcome] = counted.get(outcome, 0) + n
    return ", ".join(f"{n} x {outcome}" for outcome, n in sorted(counted.items())) or "none"


def quantile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
