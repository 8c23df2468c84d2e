"""The worker's stored summaries, kept current beside the receiver by the ingest benchmark
(bench/ingest.py), to measure what keeping them costs the callback path.

    python -m bench.summarising DATABASE_URL INTERVAL     (until SIGTERM; then prints the rounds made)

It turns the worker's own PeriodicSummaries as the worker's loop does: a pass every
ENRICH_POLL_INTERVAL (1 s), a round every INTERVAL seconds (the worker's: SUMMARY_INTERVAL, 30 s).
INTERVAL 0 counts round after round with no pause at all: the worst case, a core kept busy.
"""
from __future__ import annotations

import signal
import sys
import time

from receiver.db import bind
from receiver.maintenance import PeriodicSummaries
from receiver.settings import Settings


def main(url: str, interval: float) -> None:
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    settings = Settings.from_env(env_file=None, environ={
        "DATABASE_URL": url, "CALLBACK_TOKEN": "bench-summaries-" * 2, "API_TOKEN": "bench-summaries-" * 2})
    database = bind(settings)
    periodic = PeriodicSummaries(interval=interval)
    print("BENCH-SUMMARIES-READY", flush=True)     # started: the load may begin (a worker is already running)
    rounds = counted = 0
    while not stopping:
        due_at = periodic.next_at
        with database.connection_context():
            counted += periodic.run_if_due()
        rounds += periodic.round is None and periodic.next_at != due_at        # a round finished
        if interval:
            time.sleep(settings.enrich_poll_interval)
    print(f"BENCH-SUMMARIES {rounds} rounds, {counted} mailings counted", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
