"""Where a callback's time goes, in-process: the budget of docs/performance.md, "Ingest".

    python -m bench.ingest_budget [--callbacks 20000] [--processes 2]

Posts TWIN's example callback (a new message id each) to the receiver's WSGI entry point, as gunicorn
would, on a fresh SQLite file, with PROMETHEUS_MULTIPROC_DIR set as deployed. The steps of the real
code path are timed (CPU time of the thread) by wrapping the functions that do them (nothing else changes): parse (JSON),
validate (reading the fields), BEGIN IMMEDIATE, the two statements, commit, every 100th write's WAL checkpoint,
the rest of storing (the writers' queue, peewee's transaction, the values), metrics, and what is left of the
request (the WSGI entry, callbacks.DirectPath or Flask, the token check, reading the body, the answer). The gunicorn access log line (deploy/gunicorn.conf.py's RedactingLogger, to a file) and
the bare app of bench/ingest.py are timed the same way. With --processes 2, two processes post to
the same file at once, as two gunicorn workers do (each rereads the pages the other changed).
What no in-process timing sees (gunicorn's HTTP parsing and the sockets) is the difference between
these figures and the server CPU per request that `python -m bench ingest` prints.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

BODY = ('{"id":"budget-%d-%d","bulkId":"b973b50e-988a-4cb9-ad92-93d7cbe4d8d9",'
        '"groupId":"fb4c65dc-993c-430f-a68d-8fa1c149697f","flowId":"83f5d058-8ed8-47f7-bddb-dd69a9b249a8",'
        '"oldStatus":"PENDING","newStatus":"DELIVERED","oldStatusCode":2,"newStatusCode":6,'
        '"price":2.5,"partCount":1,"callbackData":"bench-ingest"}')
# CPU time of the thread: what a step costs, without the time it waits (for the other process's turn
# at the write lock) or is preempted (wrk, the other process, anything else running).
clock = time.thread_time_ns
STEPS = ("parse", "validate", "BEGIN IMMEDIATE", "event insert", "message upsert", "commit", "checkpoint",
         "queue, peewee, values", "metrics", "request, answer")


class Timer:
    """Time spent in wrapped callables, per step name, in ns."""

    def __init__(self, clock=clock):
        self.clock = clock
        self.spent: dict[str, int] = defaultdict(int)

    def wrap(self, owner, name: str, step: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = self.clock()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[step] += self.clock() - started
        setattr(owner, name, timed)


def environ_for(path: str, body: bytes) -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": path, "RAW_URI": path, "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "wrk",
            "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(),
            "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": True,
            "wsgi.run_once": False}


def post(app, path: str, body: bytes) -> tuple[int, str, list]:
    """One request through the WSGI entry point; (ns, status, headers)."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer.update(status=status, headers=headers)
    started = clock()
    for _ in app(environ_for(path, body), start_response):
        pass
    return clock() - started, answer["status"], answer["headers"]


def access_logger(workdir: Path):
    """deploy/gunicorn.conf.py's RedactingLogger, writing the access log to a file."""
    from gunicorn.config import Config

    from receiver.demo import GUNICORN_CONF
    namespace: dict = {"__file__": str(GUNICORN_CONF)}
    exec(compile(GUNICORN_CONF.read_text(), str(GUNICORN_CONF), "exec"), namespace)
    config = Config()
    config.set("accesslog", str(workdir / "access.log"))
    config.set("errorlog", str(workdir / "error.log"))
    config.set("access_log_format", namespace["access_log_format"])
    return namespace["RedactingLogger"](config)


def run(worker: int, callbacks: int, database_url: str, start_at: float, results) -> None:
    from bench.ingest import API_TOKEN, CALLBACK_TOKEN, PATH, bare_app
    from receiver import callbacks as receiver_callbacks
    from receiver import create_app, jsonbody, metrics
    from receiver.db import db
    from receiver.settings import Settings

    settings = Settings.from_env({"DATABASE_URL": database_url, "CALLBACK_TOKEN": CALLBACK_TOKEN,
                                  "API_TOKEN": API_TOKEN}, env_file=None)
    app = create_app(settings)
    timer = Timer()
    timer.wrap(jsonbody, "loads", "parse")
    timer.wrap(receiver_callbacks, "parse_callback", "validate")
    timer.wrap(receiver_callbacks.EVENT_INSERT, "execute", "event insert")
    timer.wrap(receiver_callbacks.MESSAGE_UPSERT, "execute", "message upsert")
    timer.wrap(db.obj, "begin", "BEGIN IMMEDIATE")
    timer.wrap(db.obj, "commit", "commit")
    timer.wrap(db.obj, "_checkpoint", "checkpoint")
    waited = Timer(clock=time.perf_counter_ns)      # the checkpoint's fsyncs are time, not CPU
    waited.wrap(db.obj, "_checkpoint", "checkpoint")
    timer.wrap(receiver_callbacks, "store_callback", "store")
    timer.wrap(metrics, "count_callback", "metrics")
    logger = access_logger(Path(database_url.removeprefix("sqlite:///")).parent / f"log-{worker}")
    logging.getLogger("receiver").setLevel(logging.WARNING)
    for number in range(200):                                   # warm-up: caches, the first connection
        post(app, PATH, (BODY % (worker + 100, number)).encode())
    timer.spent.clear()
    waited.spent.clear()
    while time.time() < start_at:                               # the processes start together
        time.sleep(0.001)
    total = log_ns = bare_ns = 0
    for number in range(callbacks):
        body = (BODY % (worker, number)).encode()
        spent, status, headers = post(app, PATH, body)
        assert status.startswith("200"), status
        total += spent
        response = SimpleNamespace(status=status, sent=35, headers=headers)
        request = SimpleNamespace(headers=[("HOST", "127.0.0.1:8000"), ("USER-AGENT", "wrk")])
        started = clock()
        logger.access(response, request, environ_for(PATH, body), dt.timedelta(microseconds=1500))
        log_ns += clock() - started
        bare_ns += post(bare_app, PATH, body)[0]
    spent = dict(timer.spent)
    spent.setdefault("checkpoint", 0)
    spent["queue, peewee, values"] = (spent.pop("store") - spent["BEGIN IMMEDIATE"] - spent["event insert"]
                                      - spent["message upsert"] - spent["commit"] - spent["checkpoint"])
    spent["request, answer"] = total - sum(spent.values())
    results.put({"steps": spent, "total": total, "log": log_ns, "bare": bare_ns, "callbacks": callbacks,
                 "checkpoint_wall": waited.spent["checkpoint"]})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_budget", description=__doc__.split("\n")[0])
    parser.add_argument("--callbacks", type=int, default=20_000, help="per process (default 20,000)")
    parser.add_argument("--processes", type=int, default=2, help="processes posting at once (default 2)")
    options = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="twin24-bench-budget-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
    (workdir / "metrics").mkdir()
    for process in range(options.processes):
        (workdir / f"log-{process}").mkdir()
    database_url = f"sqlite:///{workdir}/receiver.db"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 8.0
    workers = [context.Process(target=run, args=(n, options.callbacks, database_url, start_at, results))
               for n in range(options.processes)]
    try:
        for worker in workers:
            worker.start()
        found = [results.get(timeout=3600) for _ in workers]
        for worker in workers:
            worker.join()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    count = sum(f["callbacks"] for f in found)

    def per_callback(values) -> float:
        return sum(values) / count / 1000
    print(f"ingest budget: {options.callbacks:,} callbacks in each of {options.processes} processes, "
          f"in-process (WSGI entry point), SQLite WAL synchronous=NORMAL; CPU µs per callback, mean")
    budget = {step: per_callback(f["steps"][step] for f in found) for step in STEPS}
    for step in STEPS:
        print(f"  {step:<24} {budget[step]:>7.1f}")
    app_total = per_callback(f["total"] for f in found)
    print(f"  {'receiver app, total':<24} {app_total:>7.1f}")
    checkpoint_wall = per_callback(f["checkpoint_wall"] for f in found)
    print(f"  {'checkpoint, wall time':<24} {checkpoint_wall:>7.1f}   (the request waits for its fsyncs too)")
    log_total = per_callback(f["log"] for f in found)
    bare_total = per_callback(f["bare"] for f in found)
    print(f"  {'access log line':<24} {log_total:>7.1f}   (RedactingLogger to a file: as deployed only)")
    print(f"  {'bare app, total':<24} {bare_total:>7.1f}   (bench/ingest.py's bare_app: parse, answer 200)")
    spread = [f["total"] / f["callbacks"] / 1000 for f in found]
    print(f"  receiver app per process: {', '.join(f'{s:.1f}' for s in spread)} "
          f"(median {statistics.median(spread):.1f})")
    return {"steps": budget, "app": app_total, "log": log_total, "bare": bare_total,
            "checkpoint_wall": checkpoint_wall}


if __name__ == "__main__":
    main()
