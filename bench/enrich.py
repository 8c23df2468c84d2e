"""Enrichment at mailing scale: how many TWIN calls, and how fast chat ids arrive.

    python -m bench enrich [--messages 10000] [--sweep-interval 5] ...

Runs the real thing on this machine: the TWIN simulator (in this process), the receiver under
gunicorn with deploy/gunicorn.conf.py on a fresh SQLite file, and the enrichment worker as its own
process. One mailing of N destinations goes to the simulator with the receiver as callbackUrl;
the simulator delivers them over some seconds and its bot answers most of them later. When every
message is settled, the figures are read from the receiver's database and the simulator's call
counts, and scored against the simulator's ground truth.

Then a small late mailing (--late, default 20 messages) goes out while the first one's messages
still sit in the statistics window: the case where a sweep is most expensive and a batching worker
is most tempted to wait. Its DELIVERED-to-chat-id times are reported on their own.

The targets (issue 4): at most 5 TWIN statistics/auth calls per 1,000 delivered messages, and a
median under 5 s from the DELIVERED callback to the chat id stored, when the statistics already
have it (stats_lag = 0 here).
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
from pathlib import Path

import requests

from receiver.demo import GUNICORN_CONF, free_port, start_process, stop_processes, wait_healthy
from receiver.settings import Settings
from receiver.simulator import SimConfig, Simulator
from receiver.status import FAILED_STATUSES

CALLBACK_TOKEN = "bench-callback-token-0123456789"
API_TOKEN = "bench-api-token-0123456789abcdef"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench enrich", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    # Defaults are the production defaults (receiver/settings.py).
    parser.add_argument("--sweep-interval", type=float, default=4.0, help="ENRICH_SWEEP_INTERVAL, s")
    parser.add_argument("--result-interval", type=float, default=30.0, help="ENRICH_RESULT_INTERVAL, s")
    parser.add_argument("--first-check", type=float, default=2.0, help="ENRICH_FIRST_CHECK, s")
    parser.add_argument("--backoff-start", type=float, default=5.0, help="ENRICH_BACKOFF_START, s")
    parser.add_argument("--max-wait", type=float, default=Settings.enrich_max_wait, help="ENRICH_MAX_WAIT, s")
    parser.add_argument("--late", type=int, default=20, help="messages in the late mailing (0: none)")
    parser.add_argument("--page-cap", type=int, default=1000, help="the simulator's largest page")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up the run after this, s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    workdir = Path(tempfile.mkdtemp(prefix="bench-enrich-"))
    twin = Simulator(SimConfig(
        seed=2024, pending_after=(0.2, 2.0), final_after=(0.5, 8.0), undelivered_rate=0.05,
        stats_lag=0.0, result_after=(3.0, 40.0), no_reply_rate=0.2, session_close_after=45.0,
        page_cap=args.page_cap, callback_workers=8,
    )).start()
    port = free_port()
    env = receiver_env(twin, workdir, port, args)
    processes = []
    try:
        processes.append(start_process(["gunicorn", "-c", str(GUNICORN_CONF), "wsgi:app"], env,
                                       workdir / "web.log"))
        wait_healthy(f"http://127.0.0.1:{port}/healthz")
        processes.append(start_process(["python", "-m", "receiver", "worker"], env, workdir / "worker.log"))

        started = time.monotonic()
        ids = send_mailing(twin, f"http://127.0.0.1:{port}", args.messages)
        sent_in = time.monotonic() - started
        settled_in = wait_settled(workdir / "receiver.db", len(ids), twin, args.timeout, started)
        report(workdir / "receiver.db", twin, ids, sent_in, settled_in, args)
        if args.late:
            calls_before = lookup_calls(twin)
            late_ids = send_mailing(twin, f"http://127.0.0.1:{port}", args.late, first=args.messages)
            wait_chat_ids(workdir / "receiver.db", late_ids, twin, timeout=120)
            report_late(workdir / "receiver.db", twin, late_ids, calls_before)
    finally:
        stop_processes(processes)
        twin.stop()
    print(f"(logs and database kept in {workdir})")
    return 0


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
        "ENRICH_FIRST_CHECK": str(args.first_check), "ENRICH_SWEEP_INTERVAL": str(args.sweep_interval),
        "ENRICH_RESULT_INTERVAL": str(args.result_interval), "ENRICH_BACKOFF_START": str(args.backoff_start),
        "ENRICH_MAX_WAIT": str(args.max_wait),
        # Shorter than production so that the run ends: the simulator's bot answers within 40 s.
        "ENRICH_BACKOFF_MAX": "30", "ENRICH_RESULT_HORIZON": "120", "ENRICH_CHAT_ID_HORIZON": "120",
    })
    (workdir / "metrics").mkdir()
    return env


def send_mailing(twin, receiver_url: str, count: int, first: int = 0) -> list[str]:
    body = {"messages": [{
        "channels": {"chat": {"chatId": "bench-channel", "botId": "bench-bot", "messengerType": "WHATSAPP",
                              "chatSessionName": "Опрос", "text": "Здравствуйте!", "provider": "TWIN"}},
        "callbackUrl": f"{receiver_url}/callbacks/{CALLBACK_TOKEN}",
        "callbackData": "bench-mailing",
        "destinations": [{"phone": f"7999{n:07d}"} for n in range(first, first + count)],
    }]}
    answer = requests.post(f"{twin.notify_url}/messages", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {twin.static_token}"})
    answer.raise_for_status()
    return [item["id"] for item in answer.json()]


def wait_settled(db_path: Path, count: int, twin, timeout: float, started: float) -> float | None:
    deadline = time.monotonic() + timeout
    last_line = 0.0
    while time.monotonic() < deadline:
        stages = stage_counts(db_path)
        settled = stages.get("done", 0) + stages.get("given_up", 0) + undelivered(db_path)
        if time.monotonic() - last_line > 10:
            print(f"  {time.monotonic() - started:5.0f} s  stages {stages}", flush=True)
            last_line = time.monotonic()
        if settled >= count and twin.idle():
            return time.monotonic() - started
        time.sleep(1.0)
    return None


def wait_chat_ids(db_path: Path, ids: list[str], twin, timeout: float) -> None:
    """Until every delivered message of `ids` has a chat id (or `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        truth = {t["id"]: t for t in twin.truth()}
        delivered = [i for i in ids if truth[i]["finalStatus"] == "DELIVERED"]
        rows = read_rows(db_path)
        if twin.idle() and all(i in rows and rows[i]["chat_id"] for i in delivered):
            return
        time.sleep(0.5)


def stage_counts(db_path: Path) -> dict:
    try:
        with sqlite3.connect(db_path, timeout=30) as connection:
            return dict(connection.execute("select stage, count(*) from message group by stage"))
    except sqlite3.OperationalError:
        return {}


def undelivered(db_path: Path) -> int:
    marks = ", ".join("?" * len(FAILED_STATUSES))
    with sqlite3.connect(db_path, timeout=30) as connection:
        return connection.execute(
            f"select count(*) from message where stage = 'none' and status in ({marks})", FAILED_STATUSES
        ).fetchone()[0]


def read_rows(db_path: Path) -> dict:
    with sqlite3.connect(db_path, timeout=30) as connection:
        connection.row_factory = sqlite3.Row
        return {r["id"]: r for r in connection.execute(
            "select id, status, stage, chat_id, result, delivered_at, chat_id_at from message")}


def chat_id_delays(db_path: Path, ids: list[str]) -> dict[str, float]:
    """Seconds from each message's DELIVERED callback to its chat id stored; negative where a sweep
    stored the chat id before the callback came (delivered_at may come from the statistics)."""
    rows = read_rows(db_path)
    with sqlite3.connect(db_path, timeout=30) as connection:
        callback_at = dict(connection.execute(
            "select message_id, min(received_at) from event where new_status = 'DELIVERED' group by message_id"))
    return {i: seconds_between(callback_at[i], rows[i]["chat_id_at"])
            for i in ids if i in rows and rows[i]["chat_id_at"] and i in callback_at}


def lookup_calls(twin) -> dict[str, int]:
    return {name: sum(outcomes.values()) for name, outcomes in twin.calls().items()
            if name in ("login", "refresh", "messages_stats", "sessions_stats")}


def report(db_path: Path, twin, ids, sent_in, settled_in, args) -> None:
    truth = {t["id"]: t for t in twin.truth()}
    rows = read_rows(db_path)
    delivered = [i for i in ids if truth[i]["finalStatus"] == "DELIVERED"]
    answered = [i for i in delivered if truth[i]["result"] is not None]
    chat_ok = sum(1 for i in delivered if i in rows and rows[i]["chat_id"] == truth[i]["sessionId"])
    result_ok = sum(1 for i in answered if i in rows and rows[i]["result"]
                    and json.loads(rows[i]["result"]) == truth[i]["result"])
    delays = chat_id_delays(db_path, delivered)
    # A chat id found in the statistics before the DELIVERED callback came counts as 0 s.
    latencies = [max(0.0, d) for d in delays.values()]
    after_callback = [d for d in delays.values() if d > 0]
    calls = lookup_calls(twin)
    total_calls = sum(calls.values())
    per_thousand = 1000 * total_calls / max(len(delivered), 1)

    print()
    print(f"enrichment benchmark: {len(ids)} messages, one mailing; machine: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}")
    print(f"  settings: ENRICH_SWEEP_INTERVAL={args.sweep_interval} ENRICH_RESULT_INTERVAL={args.result_interval} "
          f"ENRICH_FIRST_CHECK={args.first_check} ENRICH_BACKOFF_START={args.backoff_start} "
          f"ENRICH_MAX_WAIT={args.max_wait}; simulator page cap {args.page_cap}")
    print(f"  send answered in {sent_in:.1f} s; everything settled in "
          f"{'did not settle' if settled_in is None else f'{settled_in:.0f} s'}")
    print(f"  delivered (truth)              {len(delivered):>7}")
    print(f"  with the right chat id         {chat_ok:>7}   ({pct(chat_ok, len(delivered))})")
    print(f"  answered by the bot (truth)    {len(answered):>7}")
    print(f"  with the right result          {result_ok:>7}   ({pct(result_ok, len(answered))})")
    print(f"  TWIN calls for lookups         {total_calls:>7}   {calls}")
    print(f"  calls per 1,000 delivered      {per_thousand:>7.1f}   (target <= 5; by hand: 2,000)")
    print(f"  DELIVERED callback -> chat id  median {quantile(latencies, 50):.2f} s (target < 5 s), "
          f"p90 {quantile(latencies, 90):.2f} s; {len(latencies) - len(after_callback)} of {len(latencies)} "
          f"were found before their callback came")
    print(f"    of the {len(after_callback)} found after their callback: median {quantile(after_callback, 50):.2f} s, "
          f"p90 {quantile(after_callback, 90):.2f} s, max {max(after_callback, default=float('nan')):.2f} s")


def report_late(db_path: Path, twin, ids, calls_before: dict) -> None:
    truth = {t["id"]: t for t in twin.truth()}
    delivered = [i for i in ids if truth[i]["finalStatus"] == "DELIVERED"]
    rows = read_rows(db_path)
    chat_ok = sum(1 for i in delivered if i in rows and rows[i]["chat_id"] == truth[i]["sessionId"])
    latencies = [max(0.0, d) for d in chat_id_delays(db_path, delivered).values()]
    calls = {name: n - calls_before.get(name, 0) for name, n in lookup_calls(twin).items()}
    print(f"  late mailing of {len(ids)}: {chat_ok} of {len(delivered)} delivered with the right chat id; "
          f"DELIVERED callback -> chat id median {quantile(latencies, 50):.2f} s, "
          f"max {max(latencies, default=float('nan')):.2f} s; TWIN calls meanwhile {sum(calls.values())} {calls}")


def quantile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def seconds_between(start: str, end: str) -> float:
    from datetime import datetime
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
