"""Memory benchmark: resident memory of the web workers and the enrichment worker over 100,000 callbacks.

    python -m bench memory

gunicorn (deploy/gunicorn.conf.py, SQLite) and `python -m receiver worker` (pointed at a local TWIN
simulator, so that its sweeps run: the benchmark's messages are unknown to TWIN and keep coming due)
receive BENCH_CALLBACKS (default 100,000) callbacks in steps; after each step the RSS and PSS of every
process is read from /proc. Target: under 200 MB together, and flat (no growth per callback).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from receiver.demo import with_code

from .ingest import API_TOKEN, CALLBACK_TOKEN, PATH, Server, children_of, machine


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB; PSS shares each shared page among the processes that map it."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def main(argv: list[str] | None = None) -> dict:
    if argv:
        raise SystemExit(f"memory takes no options ({' '.join(argv)}); it reads BENCH_* variables (see above)")
    from receiver.simulator import SimConfig, Simulator

    from .loadgen import run_load

    total = int(os.environ.get("BENCH_CALLBACKS", "100000"))
    steps = 5
    workdir = Path(tempfile.mkdtemp(prefix="twin24-bench-memory-"))
    db_url = f"sqlite:///{workdir}/receiver.db"
    print(f"memory: {total:,} callbacks in {steps} steps, 32 connections; machine: {machine()}")
    rows = []
    worker = None
    sim = Simulator(SimConfig(seed=3)).start()
    try:
        env = {"DATABASE_URL": db_url, "TWIN24_TOKEN": sim.static_token, "TWIN24_AUTH_URL": sim.auth_url,
               "TWIN24_NOTIFY_URL": sim.notify_url, "TWIN24_ANALYSE_URL": sim.analyse_url,
               "ENRICH_FIRST_CHECK": "0", "ENRICH_BACKOFF_START": "1", "ENRICH_BACKOFF_MAX": "5",
               "ENRICH_SWEEP_INTERVAL": "1", "ENRICH_POLL_INTERVAL": "0.5"}
        with Server("wsgi:app", workdir / "web", env) as server:
            worker_env = server.env | {"CALLBACK_TOKEN": CALLBACK_TOKEN, "API_TOKEN": API_TOKEN}
            worker = subprocess.Popen([sys.executable, "-m", "receiver", "worker"], cwd=workdir,
                                      env=with_code(worker_env),
                                      stdout=subprocess.DEVNULL, stderr=open(workdir / "worker.log", "ab"),
                                      start_new_session=True)
            sent = 0
            for step in range(steps + 1):
                if step:
                    result = run_load("127.0.0.1", server.port, PATH, connections=32, duration=3600,
                                      max_requests=total // steps)
                    sent += result.requests
                web = [memory_kb(pid) for pid in children_of(server.process.pid)]
                master = memory_kb(server.process.pid)
                enrich = memory_kb(worker.pid)
                rows.append((sent, sum(r for r, _ in web), sum(p for _, p in web), master, enrich, len(web)))
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"  {'callbacks':>10} {'web RSS MB':>11} {'web PSS MB':>11} {'master RSS':>11} {'worker RSS':>11} "
          f"{'total PSS MB':>13}")
    for sent, web_rss, web_pss, master, enrich, _n in rows:
        total_pss = web_pss + master[1] + enrich[1]
        print(f"  {sent:>10,} {web_rss / 1024:>11.1f} {web_pss / 1024:>11.1f} {master[0] / 1024:>11.1f} "
              f"{enrich[0] / 1024:>11.1f} {total_pss / 1024:>13.1f}")
    first, last = rows[1], rows[-1]        # after the first step: imports and caches are warm
    growth_web = (last[1] - first[1]) / 1024
    growth_worker = (last[4][0] - first[4][0]) / 1024
    per = max(last[0] - first[0], 1)
    together_rss = (last[1] + last[3][0] + last[4][0]) / 1024
    together_pss = (last[2] + last[3][1] + last[4][1]) / 1024
    print(f"  web workers: {rows[-1][5]}; together after {last[0]:,} callbacks: RSS {together_rss:.0f} MB "
          f"(PSS {together_pss:.0f} MB)   (target < 200 MB)")
    print(f"  growth from {first[0]:,} to {last[0]:,} callbacks: web {growth_web:+.1f} MB, worker "
          f"{growth_worker:+.1f} MB ({(growth_web + growth_worker) * 1024 * 1024 / per:+.1f} bytes per callback)")
    return {"rss_mb": together_rss, "pss_mb": together_pss, "growth_web_mb": growth_web,
            "growth_worker_mb": growth_worker}


if __name__ == "__main__":
    main()
