"""Ingest benchmark: TWIN callbacks stored per second by the receiver, against a bare endpoint, under wrk.

    python -m bench ingest          (or: make bench; needs wrk: `apt-get install wrk`)

Each run starts gunicorn with deploy/gunicorn.conf.py, the same settings every time, five times:
a bare Flask app that parses the JSON and answers 200 (`bare_app` below) and the receiver (wsgi:app,
on a fresh database), both without an access log (the fair comparison), then the receiver as
deployed, with gunicorn's access log (RedactingLogger) written to a file, then the receiver without
it twice more while the worker's stored summaries are counted beside it (bench/summarising.py): a
round every 30 s as the worker does, and back to back (RECEIVER_RUNS). Each server gets a 2 s
warm-up, then wrk loads it (bench/ingest.lua: a new message id per request, TWIN's example body).
Afterwards the server is stopped gracefully, every wrk thread's id space is counted in the event
table (see `missing`) and the server's files are deleted; before each server, `sync` (see `settle`). Environment: BENCH_DURATION (s, default 10), BENCH_CONNECTIONS (32),
BENCH_THREADS (wrk threads, 2), BENCH_RUNS (3), BENCH_WORKERS (GUNICORN_WORKERS; default:
gunicorn.conf.py's own choice), BENCH_DATABASE_URL (postgresql://...: store in a schema of its own
on that server instead of SQLite).

wrk runs on the same machine and shares its cores with the server; its CPU is printed.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, jsonify, request

from receiver.demo import GUNICORN_CONF, free_port, stop_processes, with_code
from receiver.maintenance import SUMMARY_INTERVAL

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

    def __init__(self, workdir: Path, postgres_url: str | None):
        self.postgres_url = postgres_url
        self.path = workdir / "receiver.db"
        self.schema = f"bench_ingest_{os.getpid()}_{workdir.parent.name}_{workdir.name}".replace("-", "_")

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

    def stored_ids(self) -> list[str]:
        """The message id of every stored event."""
        sql = "SELECT message_id FROM event"
        if self.postgres_url:
            rows = self._postgres(sql)
        else:
            with sqlite3.connect(self.path) as connection:
                rows = connection.execute(sql).fetchall()
        return [message_id for (message_id,) in rows]

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


# --- wrk --------------------------------------------------------------------------------------------
WRK = "wrk"
SCRIPT = Path(__file__).with_name("ingest.lua")
# After the load, wrk runs this much longer without sending, so that every callback sent is answered.
DRAIN_SECONDS = 2.0
WRK_MISSING = "wrk is not installed: `sudo apt-get install wrk` (Debian, Ubuntu) or see https://github.com/wg/wrk"


@dataclass
class Space:
    """One wrk thread's message ids (`name`-1 ... `name`-sent) and what became of them."""
    name: str
    sent: int
    ok: int                     # answered 2xx
    other: int                  # answered otherwise
    first_sent: float           # CLOCK_MONOTONIC seconds: the thread's first request
    last_answer: float          # and its last answer
    stored: int = 0             # distinct ids of the space in the event table

    @property
    def missing(self) -> tuple[int, int]:
        """(at least, at most) acknowledged callbacks missing from the table. Every id is sent once, so
        the stored ids are among those sent; when every one sent was answered 2xx (the script stops
        sending before wrk stops), the acknowledged ones are exactly those sent, and the two bounds meet:
        sent - stored."""
        return max(0, self.ok - self.stored), min(self.sent - self.stored, self.ok)


@dataclass
class Load:
    """What one wrk run measured."""
    requests: int
    errors: dict
    p50: float                  # seconds, from wrk's latency distribution
    p99: float
    spaces: list[Space]
    server_cpu: float = 0.0     # CPU seconds of gunicorn's processes per answered request
    wrk_cpu: float = 0.0        # CPU seconds of wrk per answered request
    synced: float = 0.0         # seconds settle() took before the server started
    load_average: float = 0.0   # the machine's 1-minute load average when the server started
    summary_rounds: str | None = None   # rounds of stored summaries counted during the load (bench/summarising.py)

    @property
    def ok(self) -> int:
        return sum(space.ok for space in self.spaces)

    @property
    def seconds(self) -> float:
        """From the first request sent to the last answer received, over all threads."""
        return max(s.last_answer for s in self.spaces) - min(s.first_sent for s in self.spaces)

    @property
    def rate(self) -> float:
        """Callbacks answered 2xx per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def not_ok(self) -> int:
        """Answers other than 2xx, and socket errors and timeouts."""
        return sum(space.other for space in self.spaces) + sum(self.errors.values()) - self.errors["status"]

    @property
    def unanswered(self) -> int:
        return sum(space.sent - space.ok - space.other for space in self.spaces)


@contextlib.contextmanager
def summaries_beside(url: str, interval: float | None, workdir: Path):
    """With an interval: bench/summarising.py runs on the database for the block. Gives a list that then
    holds its report (the rounds it made); without, nothing runs and the list stays empty."""
    report: list[str] = []
    if interval is None:
        yield report
        return
    process = subprocess.Popen([sys.executable, "-m", "bench.summarising", url, str(interval)], cwd=workdir,
                               env=with_code(dict(os.environ)), stdout=subprocess.PIPE, text=True)
    try:
        # Python's start is not part of the worker's cost: the load begins once it is running.
        if process.stdout.readline().strip() != "BENCH-SUMMARIES-READY":
            raise RuntimeError(f"bench.summarising did not start ({process.wait()})")
        yield report
    finally:
        stop_processes([process])
    line = next((line for line in process.stdout.read().splitlines() if line.startswith("BENCH-SUMMARIES ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"bench.summarising failed ({process.returncode})")
    report.append(line.partition(" ")[2])


def wrk(server: Server, tag: str, duration: float, threads: int, connections: int) -> Load:
    """Load `server` with wrk for `duration` seconds; message ids start with `tag`."""
    if shutil.which(WRK) is None:
        raise SystemExit(WRK_MISSING)
    command = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration + DRAIN_SECONDS:g}s", "--latency",
               "-s", str(SCRIPT), f"{server.url}{PATH}", "--", tag, f"{duration:g}"]
    cpu_before, children_before = cpu_seconds(server), _children_cpu()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    line = next((line for line in finished.stdout.splitlines() if line.startswith("BENCH-INGEST ")), None)
    if finished.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    found = json.loads(line.partition(" ")[2])
    load = Load(requests=found["requests"], errors=found["errors"], p50=found["p50_us"] / 1e6,
                p99=found["p99_us"] / 1e6, spaces=[Space(s["space"], s["sent"], s["2xx"], s["other"], s["first_sent"],
                                                         s["last_answer"]) for s in found["spaces"]])
    answered = max(load.requests, 1)
    load.server_cpu = (cpu_seconds(server) - cpu_before) / answered
    load.wrk_cpu = (_children_cpu() - children_before) / answered
    return load


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def count_stored(loads: list[Load], database: Database) -> None:
    """Fill each space's `stored` from the event table (the server stopped: nothing is in flight)."""
    per_space = Counter(message_id.rpartition("-")[0] for message_id in set(database.stored_ids()))
    for load in loads:
        for space in load.spaces:
            space.stored = per_space[space.name]


# --- one run: the bare app, the receiver, the receiver as deployed ------------------------------------
NO_ACCESS_LOG = {"GUNICORN_ACCESS_LOG": ""}


def settle() -> float:
    """Have every file written so far on the disk before the next server starts; the seconds it took.

    A receiver run leaves tens of MB of database and WAL in the page cache, which the kernel writes back
    about 30 s later (vm.dirty_expire_centisecs), in the middle of the next run, where the receiver's
    checkpoints (fsync) wait for it; the bare app, which never syncs, would not be slowed by it."""
    started = time.monotonic()
    os.sync()
    return time.monotonic() - started


def measure(app: str, workdir: Path, env: dict, tag: str, options: dict, database: Database | None = None,
            summaries_every: float | None = None):
    """Start `app` under gunicorn, warm it up for 2 s, load it; with `database`, count what it stored,
    then delete the server's files (and settle() that too, before the next server). summaries_every:
    the worker's stored summaries are counted meanwhile, a round every that many seconds."""
    workdir.mkdir(parents=True)
    synced = settle()
    load_average = os.getloadavg()[0]
    with Server(app, workdir, env) as server:
        wrk(server, f"{tag}w", 2.0, options["threads"], options["connections"])     # warm-up (and schema)
        workers = len(server.worker_pids())
        with summaries_beside(env["DATABASE_URL"], summaries_every, workdir) as rounds:
            load = wrk(server, tag, options["duration"], options["threads"], options["connections"])
        load.summary_rounds = " ".join(rounds) or None
    if database is not None:
        count_stored([load], database)
    shutil.rmtree(workdir, ignore_errors=True)
    load.synced, load.load_average = synced, load_average
    return load, workers


# The receiver's runs: (name, gunicorn's access log, seconds between rounds of the stored summaries
# counted meanwhile (bench/summarising.py): None, none; 0, back to back).
RECEIVER_RUNS = (("receiver", NO_ACCESS_LOG, None), ("deployed", {}, None),
                 ("summarised", NO_ACCESS_LOG, SUMMARY_INTERVAL), ("back-to-back", NO_ACCESS_LOG, 0.0))


def one_run(number: int, workdir: Path, postgres_url: str | None, options: dict) -> dict:
    """The bare app, then the receiver: without access log, with it, and without it while the stored
    summaries are counted at the worker's pace and then back to back (RECEIVER_RUNS), in that order."""
    run = workdir / f"run{number}"
    loads = {}
    # The bare app gets a receiver's DATABASE_URL too: gunicorn.conf.py sizes its workers by it.
    env = {"DATABASE_URL": Database(run / "receiver", postgres_url).url} | NO_ACCESS_LOG
    loads["bare"], workers = measure("bench.ingest:bare_app", run / "bare", env, f"b{number}", options)
    for kind, logging, summaries_every in RECEIVER_RUNS:
        database = Database(run / kind, postgres_url)
        with database:
            loads[kind], _ = measure("wsgi:app", run / kind, {"DATABASE_URL": database.url} | logging,
                                     f"{kind[0]}{number}", options, database, summaries_every)
    loads["workers"] = workers
    return loads


# --- the report ---------------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def span(values: list[float], form: str) -> str:
    low, high = min(values), max(values)
    return format(low, form) if format(low, form) == format(high, form) else f"{low:{form}}–{high:{form}}"


def report(runs: list[dict], database_name: str) -> dict:
    print(f"gunicorn: deploy/gunicorn.conf.py, {runs[0]['workers']} sync workers, {database_name}")
    print("\nfair comparison: the same gunicorn settings, no access log on either side")
    print(f"  {'run':<4} {'bare/s':>8} {'receiver/s':>11} {'ratio':>6}   {'bare p50/p99 ms':>16}"
          f"   {'receiver p50/p99 ms':>19}   {'server CPU µs/callback bare, receiver':>38}")
    for number, run in enumerate(runs, 1):
        bare, receiver = run["bare"], run["receiver"]
        print(f"  {number:<4} {bare.rate:>8,.0f} {receiver.rate:>11,.0f} {receiver.rate / bare.rate:>6.2f}   "
              f"{ms(bare.p50) + ' / ' + ms(bare.p99):>16}   {ms(receiver.p50) + ' / ' + ms(receiver.p99):>19}   "
              f"{bare.server_cpu * 1e6:>29.0f}, {receiver.server_cpu * 1e6:.0f}")
    print("\nas deployed: the receiver with gunicorn's access log (RedactingLogger) to a file")
    print(f"  {'run':<4} {'receiver/s':>11} {'/ bare':>7}   {'p50/p99 ms':>12}   {'server CPU µs/callback':>22}")
    for number, run in enumerate(runs, 1):
        deployed = run["deployed"]
        print(f"  {number:<4} {deployed.rate:>11,.0f} {deployed.rate / run['bare'].rate:>7.2f}   "
              f"{ms(deployed.p50) + ' / ' + ms(deployed.p99):>12}   {deployed.server_cpu * 1e6:>22.0f}")
    print("\nthe stored summaries counted meanwhile by the worker's PeriodicSummaries (bench/summarising.py),"
          f" no access log: a round every {SUMMARY_INTERVAL:g} s as the worker does, then back to back")
    print(f"  {'run':<4} {'':<12} {'receiver/s':>11} {'/ without':>10}   {'p50/p99 ms':>12}   counted")
    for number, run in enumerate(runs, 1):
        for kind in ("summarised", "back-to-back"):
            load = run[kind]
            print(f"  {number:<4} {kind:<12} {load.rate:>11,.0f} {load.rate / run['receiver'].rate:>10.2f}   "
                  f"{ms(load.p50) + ' / ' + ms(load.p99):>12}   {load.summary_rounds}")
    print("\nacknowledged callbacks in the event table (per wrk thread: sent, answered 2xx, stored)")
    worst = 0
    for number, run in enumerate(runs, 1):
        for kind, _, _ in RECEIVER_RUNS:
            load = run[kind]
            spaces = "; ".join(f"{s.name}: {s.sent:,} sent, {s.ok:,} 2xx, {s.stored:,} stored" for s in load.spaces)
            least = sum(s.missing[0] for s in load.spaces)
            most = sum(s.missing[1] for s in load.spaces)
            worst = max(worst, most)
            verdict = "0 missing" if most == 0 else f"{least}–{most} missing"
            print(f"  run {number} {kind:<8} {spaces}  -> {verdict}; non-2xx or socket errors: {load.not_ok}, "
                  f"never answered: {load.unanswered}")
    ratios = [run["receiver"].rate / run["bare"].rate for run in runs]
    p99s = [max(run["receiver"].p99, run["deployed"].p99) for run in runs]
    wrk_cpu = [run["receiver"].wrk_cpu * run["receiver"].rate for run in runs]
    print(f"\nranges over {len(runs)} runs: bare {span([r['bare'].rate for r in runs], ',.0f')}/s, "
          f"receiver {span([r['receiver'].rate for r in runs], ',.0f')}/s, ratio {span(ratios, '.2f')}, "
          f"as deployed {span([r['deployed'].rate for r in runs], ',.0f')}/s, "
          f"receiver p99 {span([r['receiver'].p99 * 1000 for r in runs], '.1f')} ms")
    print(f"wrk's own CPU during the receiver runs: {span(wrk_cpu, '.0%')} of one core")
    beside = [run["summarised"].rate / run["receiver"].rate for run in runs]
    back_to_back = [run["back-to-back"].rate / run["receiver"].rate for run in runs]
    print(f"with the stored summaries counted: {span(beside, '.2f')} of the receiver's rate without them "
          f"(back to back: {span(back_to_back, '.2f')})")
    servers = [run[kind] for run in runs for kind in ("bare", *(kind for kind, _, _ in RECEIVER_RUNS))]
    print(f"before each server: sync {span([s.synced for s in servers], '.1f')} s; "
          f"load average (1 min) at its start {span([s.load_average for s in servers], '.2f')}")
    verdict = {"ratio": min(ratios) >= 0.6, "p99": max(p99s) < 0.050, "all_stored": worst == 0,
               "summaries": statistics.median(beside) >= 0.95}
    print("targets (ratio >= 0.6, p99 < 50 ms, 0 missing, summaries' median cost <= 5%): "
          + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in verdict.items()))
    return {"ratio": ratios, "bare": [r["bare"].rate for r in runs], "receiver": [r["receiver"].rate for r in runs],
            "deployed": [r["deployed"].rate for r in runs], "p99": p99s, "missing": worst, "summaries": beside,
            "verdict": verdict}


def main(argv: list[str] | None = None) -> dict:
    if argv:
        raise SystemExit(f"ingest takes no options ({' '.join(argv)}); it reads BENCH_* variables (see above)")
    if shutil.which(WRK) is None:
        raise SystemExit(WRK_MISSING)
    options = {"duration": float(os.environ.get("BENCH_DURATION", "10")),
               "connections": int(os.environ.get("BENCH_CONNECTIONS", "32")),
               "threads": int(os.environ.get("BENCH_THREADS", "2"))}
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    postgres_url = os.environ.get("BENCH_DATABASE_URL") or None
    print(f"ingest: wrk {options['threads']} threads, {options['connections']} connections, "
          f"{options['duration']:g} s per server, {runs} runs; TWIN's example callback with a new message id each")
    print(f"machine: {machine()}; wrk shares its cores with the server")
    workdir = Path(tempfile.mkdtemp(prefix="twin24-bench-ingest-"))
    try:
        results = [one_run(number, workdir, postgres_url, options) for number in range(1, runs + 1)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report(results, Database(workdir, postgres_url).name)


if __name__ == "__main__":
    main()
