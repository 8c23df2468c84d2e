"""Forwarding at mailing scale: events per second to a local target, and how soon each result gets there.

    python -m bench forward [--messages 2000] [--poll-interval 0.5] [--batch 100]

Runs the real thing on this machine: the TWIN simulator (in this process), the receiver under gunicorn
on a fresh SQLite file, and the worker as its own process with FORWARD_URL pointing at a local target
(a threaded HTTP server in this process that verifies every signature with the `standardwebhooks`
package and answers 200). One mailing of N destinations goes to the simulator with the receiver as
callbackUrl; the worker enriches it and forwards each `message.result` as it is stored.

Figures:
* lag: from a result stored (the event's `data.result_at`) to its event acknowledged by the target
  (`delivery.delivered_at`), median and p99, while the mailing is being enriched. A sweep stores the
  results of hundreds of messages in one transaction, so their events queue behind each other: the
  lag is mostly how long such a burst takes to drain at the rate below;
* rate while enriching: events delivered per second over the mailing (bounded by how fast results come);
* drain rate: every event replayed at once (forwarding.replay: the backlog a target gets when it comes
  back), delivered per second: what one worker can push.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from standardwebhooks import Webhook
from werkzeug.serving import WSGIRequestHandler, make_server

from bench.enrich import parse_args as enrich_args
from bench.enrich import quantile, receiver_env, send_mailing, start_receiver, wait_settled
from receiver.db import db
from receiver.demo import free_port, stop_processes
from receiver.simulator import SimConfig, Simulator

SECRET = "whsec_" + "YmVuY2gtZm9yd2FyZC1zZWNyZXQtMDEyMzQ1Njc4OWFi"    # base64 of 32 bytes


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench forward", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="FORWARD_POLL_INTERVAL, s (production default)")
    parser.add_argument("--batch", type=int, default=100, help="FORWARD_BATCH (production default)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up the run after this, s")
    return parser.parse_args(argv)


class Target:
    """The user's endpoint: verifies each delivery with standardwebhooks, notes the event ids."""

    def __init__(self):
        self.webhook = Webhook(SECRET)
        self.lock = threading.Lock()
        self.arrivals: list[str] = []
        self.refused = 0
        self.server = make_server("127.0.0.1", 0, self.wsgi, threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wsgi(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {name: environ.get("HTTP_" + name.upper().replace("-", "_"), "")
                   for name in ("webhook-id", "webhook-timestamp", "webhook-signature")}
        try:
            self.webhook.verify(body, headers)
        except Exception:       # the library's verdict
            with self.lock:
                self.refused += 1
            start_response("401 Unauthorized", [])
            return [b""]
        with self.lock:
            self.arrivals.append(headers["webhook-id"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    workdir = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    db_path = workdir / "receiver.db"
    twin = Simulator(SimConfig(
        seed=2024, pending_after=(0.2, 2.0), final_after=(0.5, 5.0), undelivered_rate=0.05,
        stats_lag=0.0, result_after=(2.0, 20.0), no_reply_rate=0.2, session_close_after=25.0,
        callback_workers=8,
    )).start()
    target = Target()
    target.thread.start()
    port = free_port()
    env = receiver_env(twin, workdir, port, enrich_args([])) | {
        "ENRICH_RESULT_INTERVAL": "5",
        "FORWARD_URL": target.url, "FORWARD_SECRET": SECRET,
        "FORWARD_POLL_INTERVAL": str(args.poll_interval), "FORWARD_BATCH": str(args.batch),
        "ENRICH_RESULT_HORIZON": "60", "ENRICH_CHAT_ID_HORIZON": "60"}
    processes = []
    try:
        processes = start_receiver(env, workdir, port)
        started = time.monotonic()
        ids = send_mailing(twin, f"http://127.0.0.1:{port}", args.messages, 1)
        settled_in = wait_settled(db_path, ids, twin, args.timeout, started)
        wait_delivered(db_path, args.timeout)
        live = read_deliveries(db_path)
        drain_seconds, drained = drain(db_path, env, args.timeout)
        report(args, live, settled_in, drain_seconds, drained, target)
    finally:
        stop_processes(processes)
        target.server.shutdown()
        twin.stop()
    print(f"(logs and database kept in {workdir})")
    return 0


def pending(db_path: Path) -> int:
    with sqlite3.connect(db_path, timeout=30) as connection:
        return connection.execute("select count(*) from delivery where state = 'pending'").fetchone()[0]


def wait_delivered(db_path: Path, timeout: float) -> float:
    """Until no delivery is pending; how long that took."""
    started = time.monotonic()
    while pending(db_path) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def read_deliveries(db_path: Path) -> list[dict]:
    with sqlite3.connect(db_path, timeout=30) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(
            "select event_id, event_type, state, payload, created_at, delivered_at from delivery order by id")]


def drain(db_path: Path, env: dict, timeout: float) -> tuple[float, int]:
    """Every delivered event replayed at once; seconds until the worker has delivered them all again."""
    from receiver import forwarding
    from receiver.db import bind
    from receiver.settings import Settings

    bind(Settings.from_env(environ=env, env_file=None))
    db.connect(reuse_if_open=True)
    try:
        count = forwarding.replay()
    finally:
        db.close()
    return wait_delivered(db_path, timeout), count


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=None)


def report(args, live: list[dict], settled_in, drain_seconds: float, drained: int, target: Target) -> None:
    results = [d for d in live if d["event_type"] == "message.result" and d["delivered_at"]]
    lags = [(parse_time(d["delivered_at"]) - parse_time(json.loads(d["payload"])["data"]["result_at"])).total_seconds()
            for d in results]
    delivered = [parse_time(d["delivered_at"]) for d in live if d["delivered_at"]]
    span = (max(delivered) - min(delivered)).total_seconds() if len(delivered) > 1 else float("nan")
    print()
    print(f"forwarding benchmark: {args.messages} messages, one mailing; machine: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}; FORWARD_POLL_INTERVAL={args.poll_interval} FORWARD_BATCH={args.batch}")
    print(f"  mailing settled in {'did not settle' if settled_in is None else f'{settled_in:.0f} s'}; "
          f"events {len(live)} ({sum(d['state'] == 'delivered' for d in live)} delivered), "
          f"signatures refused by the target {target.refused}")
    print(f"  result stored -> event acknowledged   median {quantile(lags, 50):.2f} s, p99 {quantile(lags, 99):.2f} s, "
          f"max {max(lags, default=float('nan')):.2f} s ({len(lags)} message.result events)")
    print(f"  while enriching   {len(delivered) / span:8.1f} events/s   ({len(delivered)} over {span:.1f} s: "
          f"as fast as results come)")
    print(f"  backlog drain     {drained / drain_seconds:8.1f} events/s   ({drained} replayed events in "
          f"{drain_seconds:.2f} s: one worker, verified by the target)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
