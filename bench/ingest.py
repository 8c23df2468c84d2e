"""Ingest benchmark: how many TWIN callbacks per second the receiver stores, against a bare endpoint.

    python -m bench ingest          (or: make bench)

Starts gunicorn with deploy/gunicorn.conf.py twice, with the same settings: once with the receiver
(wsgi:app, on a fresh SQLite file) and once with a bare Flask app that parses the JSON and answers 200
(`bare_app` below). Each is loaded for BENCH_DURATION seconds (default 15) at BENCH_CONNECTIONS
(default 32) keep-alive connections by bench/loadgen.py; then every acknowledged callback is looked up
in the event table. Environment: BENCH_DURATION, BENCH_CONNECTIONS, BENCH_WORKERS (GUNICORN_WORKERS;
default: deploy/gunicorn.conf.py's own choice), BENCH_DUPLICATES (share of repeats, default 0.05),
BENCH_DATABASE_URL (postgresql://...: store in a schema of its own on that server instead of SQLite).

On a small machine the load generator and the server share the cores; the generator's own CPU cost is
printed so its share can be judged.
"""
from __future__ import annotations

import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from flask import Flask, jsonify, request

from receiver.demo import GUNICORN_CONF, free_port, with_code

CALLBACK_TOKEN = "bench-callback-token-0123456789"
API_TOKEN = "bench-api-token-0123456789abcdef"
PATH = f"/callbacks/{CALLBACK_TOKEN}"

# --- the bare endpoint: what any Flask receiver costs before it stores anything --------------------
bare_app = Flask("bare")


@bare_app.post("/callbacks/<token>")
def _bare_callback(token):
    request.get_json(force=True)
    return jsonify(stored=True, duplicate=False), 200


@bare_app.get("/healthz")
def _bare_health():
    return "ok"


# --- gunicorn as a child process -------------------------------------------------------------------
class Server:
    """gunicorn -c deploy/gunicorn.conf.py <app>, in its own process group, logs in `workdir`."""

    def __init__(self, app: str, workdir: Path, env: dict | None = None):
        self.app, self.workdir = app, Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "PROMETHEUS_"))}
        self.env = base | {
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "GUNICORN_ACCESS_LOG": str(self.workdir / "access.log"),
            "GUNICORN_ERROR_LOG": str(self.workdir / "error.log"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "metrics"),
            "CALLBACK_TOKEN": CALLBACK_TOKEN, "API_TOKEN": API_TOKEN, "PYTHONUNBUFFERED": "1",
        } | (env or {})
        if os.environ.get("BENCH_WORKERS"):
            self.env["GUNICORN_WORKERS"] = os.environ["BENCH_WORKERS"]
        (self.workdir / "metrics").mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), self.app], cwd=self.workdir,
            env=with_code(self.env),
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr.log", "ab"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}: {self.logs()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as answer:
                    if answer.status == 200 and len(self.worker_pids()) >= self.expected_workers():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not start within {timeout} s: {self.logs()[-2000:]}")

    def expected_workers(self) -> int:
        value = self.env.get("GUNICORN_WORKERS")
        return int(value) if value else 1

    def worker_pids(self) -> list[int]:
        """The master's children (gunicorn's workers)."""
        if self.process is None:
            return []
        return children_of(self.process.pid)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in (self.workdir / "error.log",
                                                                   self.workdir / "stderr.log") if p.exists())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group; never leaves anything running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def machine() -> str:
    cpus = os.cpu_count()
    try:
        mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        memory = f"{mem_kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, StopIteration):
        memory = "RAM unknown"
    return f"{cpus} CPUs, {memory}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


class Database:
    """Where the receiver stores: a fresh SQLite file in `workdir`, or with BENCH_DATABASE_URL
    (postgresql://...) a schema of its own on that server, dropped afterwards."""

    KEYS = "SELECT message_id, COALESCE(old_status, ''), new_status FROM event"

    def __init__(self, workdir: Path, postgres_url: str | None):
        self.postgres_url = postgres_url
        self.path = workdir / "receiver.db"
        self.schema = f"bench_ingest_{os.getpid()}"

    @property
    def name(self) -> str:
        return "PostgreSQL" if self.postgres_url else "SQLite (WAL, synchronous=NORMAL)"

    @property
    def url(self) -> str:
        if not self.postgres_url:
            return f"sqlite:///{self.path}"
        separator = "&" if "?" in self.postgres_url else "?"
        return f"{self.postgres_url}{separator}options=-csearch_path%3D{self.schema}"

    def __enter__(self) -> Database:
        if self.postgres_url:
            self._postgres(f"CREATE SCHEMA {self.schema}")
        return self

    def __exit__(self, *exc) -> None:
        if self.postgres_url:
            self._postgres(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def stored_keys(self) -> set[str]:
        """Every stored event as message id|old status|new status."""
        if self.postgres_url:
            rows = self._postgres(self.KEYS)
        else:
            with sqlite3.connect(self.path) as connection:
                rows = connection.execute(self.KEYS).fetchall()
        return {f"{m}|{o}|{n}" for m, o, n in rows}

    def _postgres(self, sql: str) -> list:
        """Runs `sql` with the receiver's URL, whose search_path is the schema."""
        import psycopg2
        connection = psycopg2.connect(self.url)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()


def cpu_seconds(server: Server) -> float:
    """CPU time (user + system) the gunicorn master and its workers have used so far, from /proc."""
    total = 0
    for pid in [server.process.pid, *server.worker_pids()]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])          # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def measured_load(server: Server, duration: float, connections: int, duplicates: float):
    """load(), and the server's CPU seconds per answered request during it."""
    before = cpu_seconds(server)
    result = load(server, duration, connections, duplicates)
    return result, (cpu_seconds(server) - before) / max(result.requests, 1)


def load(server: Server, duration: float, connections: int, duplicates: float, max_requests=None):
    from .loadgen import run_load
    return run_load("127.0.0.1", server.port, PATH, connections=connections, duration=duration,
                    duplicates=duplicates, processes=2 if connections >= 2 else 1, max_requests=max_requests)


def row(name, result) -> str:
    others = {s: n for s, n in result.statuses.items() if not 200 <= s < 300}
    return (f"  {name:<22} {result.rate:>10,.0f} {result.percentile(50) * 1000:>9.1f} "
            f"{result.percentile(99) * 1000:>9.1f} {result.ok:>9,} {sum(others.values()) + len(result.unknown):>7}")


def main(argv: list[str] | None = None) -> dict:
    if argv:
        raise SystemExit(f"ingest takes no options ({' '.join(argv)}); it reads BENCH_* variables (see above)")
    duration = float(os.environ.get("BENCH_DURATION", "15"))
    connections = int(os.environ.get("BENCH_CONNECTIONS", "32"))
    duplicates = float(os.environ.get("BENCH_DUPLICATES", "0.05"))
    workdir = Path(tempfile.mkdtemp(prefix="twin24-bench-ingest-"))
    database = Database(workdir, os.environ.get("BENCH_DATABASE_URL") or None)
    # Both servers get the receiver's DATABASE_URL: gunicorn.conf.py sizes its workers by it.
    env = {"DATABASE_URL": database.url}
    print(f"ingest: {duration:.0f} s per server at {connections} connections, {duplicates:.0%} duplicates")
    print(f"machine: {machine()}")
    print("note: the load generator runs on the same machine and shares its cores with the server")
    try:
        with Server("bench.ingest:bare_app", workdir / "bare", env) as bare:
            load(bare, 2.0, connections, duplicates)                       # warm-up
            workers = len(bare.worker_pids())
            bare_result, bare_cpu = measured_load(bare, duration, connections, duplicates)
        (workdir / "receiver").mkdir()
        with database, Server("wsgi:app", workdir / "receiver", env) as receiver:
            load(receiver, 2.0, connections, duplicates)                   # warm-up (and schema)
            receiver_result, receiver_cpu = measured_load(receiver, duration, connections, duplicates)
            stored = database.stored_keys()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"gunicorn: deploy/gunicorn.conf.py, {workers} sync workers, {database.name}")
    print(f"  {'endpoint':<22} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'2xx':>9} {'other':>7}")
    print(row("bare Flask (parse, 200)", bare_result))
    print(row("receiver (store, 200)", receiver_result))
    ratio = receiver_result.rate / bare_result.rate if bare_result.rate else 0.0
    generator_cpu = receiver_result.cpu_seconds / max(receiver_result.requests, 1)
    print(f"  ratio receiver/bare: {ratio:.2f}   (target >= 0.6)")
    print(f"  receiver p99: {receiver_result.percentile(99) * 1000:.1f} ms   (target < 50 ms at 32 connections)")
    print(f"  server CPU (gunicorn master and workers): bare {bare_cpu * 1e6:.0f} µs, "
          f"receiver {receiver_cpu * 1e6:.0f} µs per request")
    print(f"  load generator CPU: {generator_cpu * 1e6:.0f} µs per request "
          f"({generator_cpu * receiver_result.rate:.0%} of one core during the receiver run)")
    # The warm-up's callbacks are in the database too: compare the measured run's acknowledged set.
    missing = receiver_result.acknowledged - stored
    unexpected = [s for s in receiver_result.statuses if not 200 <= s < 300]
    print(f"  acknowledged callbacks (distinct id/old/new): {len(receiver_result.acknowledged):,}; "
          f"in the event table: {len(receiver_result.acknowledged) - len(missing):,}; missing: {len(missing)}")
    if unexpected:
        print(f"  non-2xx answers: { {s: receiver_result.statuses[s] for s in unexpected} }")
    verdict = {
        "ratio": ratio >= 0.6, "p99": receiver_result.percentile(99) < 0.050, "all_stored": not missing,
    }
    print("  targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in verdict.items()))
    return {"bare": bare_result.rate, "receiver": receiver_result.rate, "ratio": ratio,
            "p50": receiver_result.percentile(50), "p99": receiver_result.percentile(99),
            "missing": len(missing), "verdict": verdict}


if __name__ == "__main__":
    main()
