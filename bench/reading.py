"""Reading benchmark: the results page, the summary, /metrics and full exports over a large table.

    python -m bench reading                                   # 10,000,000 messages on SQLite
    python -m bench reading --messages 1000000 --database-url postgresql://127.0.0.1:5432/test

Builds the database once (SQLite: cached as bench/out/reading-<messages>.db; PostgreSQL: a schema of
its own, rebuilt each run) with mailings of 20,000 messages, 90% delivered, 75% of those answered with
recipe-shaped results (`nps`, `confirmation`, `initialVariables.name`), refreshes the stored mailing
summaries the way the worker does (receiver/summaries.py), starts gunicorn with
deploy/gunicorn.conf.py and times one request at a time. `--build-only` stops after the build.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.ingest import API_TOKEN, Server, machine
from receiver.demo import ROOT, with_code

OUT = ROOT / "bench" / "out"
MAILING = 20_000
BATCH = 50_000                       # rows per executemany (and per transaction on SQLite)
NAMES = ("Иван", "Мария", "Пётр", "Анна", "Олег", "Елена", "Сергей", "Ольга", "Денис", "Юлия", "Артём",
         "Наталья", "Михаил", "Татьяна", "Алексей", "Светлана")
CONFIRMATIONS = ("Да", "Нет", "Отказ")
COLUMNS = ("id", "callback_data", "bulk_id", "phone", "destination_index", "status", "status_code",
           "status_rank", "status_at", "first_seen_at", "last_seen_at", "delivered_at", "stage", "attempts",
           "given_up_reason", "chat_id", "chat_id_at", "session_status", "bot_status", "result", "result_at")
EPOCH = dt.datetime(2025, 1, 1)


# ---- building --------------------------------------------------------------------------------------

def rows(messages: int, seed: int = 15):
    """The messages, in first_seen_at order: one mailing a day, 20 a second."""
    rng = random.Random(seed)
    for number in range(messages):
        mailing, index = divmod(number, MAILING)
        yield row(rng, mailing, index)


def row(rng: random.Random, mailing: int, index: int) -> tuple:
    first = EPOCH + dt.timedelta(days=mailing, seconds=index / 20)
    delivered = rng.random() < 0.9
    answered = delivered and rng.random() < 0.75
    at = first + dt.timedelta(seconds=5)
    result = None
    if answered:
        result = json.dumps({"nps": str(rng.randint(1, 10)), "confirmation": rng.choice(CONFIRMATIONS),
                             "initialVariables": {"name": rng.choice(NAMES)}}, ensure_ascii=False)
    stage = "done" if answered else "given_up" if delivered else "none"
    return (
        f"{rng.getrandbits(128):032x}", f"spring-{mailing:04d}", f"bulk-{mailing:04d}",
        f"7999{rng.randrange(10_000_000):07d}", index,
        "DELIVERED" if delivered else "UNDELIVERED", 6 if delivered else 5, 4 if delivered else 3, at,
        first, at, at if delivered else None, stage, 1 if delivered else 0,
        None if answered or not delivered else "no result within 24 h",
        f"chat-{rng.getrandbits(64):016x}" if answered else None, at if answered else None,
        "CLOSED" if answered else None, "FINISHED" if answered else None, result, at if answered else None)


def build(database_url: str, messages: int) -> None:
    """Fill an empty database (schema made by the receiver) with `messages` rows, indexes made after."""
    from receiver import models
    from receiver.db import bind
    from receiver.settings import Settings

    settings = Settings.from_env(env_file=None, environ={"DATABASE_URL": database_url, "CALLBACK_TOKEN": "x" * 32, "API_TOKEN": API_TOKEN})
    database = bind(settings)
    models.create_schema()
    with database.connection_context():
        indexes = [i.name for i in database.get_indexes("message") if not i.name.startswith("sqlite_autoindex")]
        indexes = [name for name in indexes if not name.endswith("_pkey")]
        for name in indexes:
            database.execute_sql(f'DROP INDEX "{name}"')
        insert = (f'INSERT INTO "message" ({", ".join(COLUMNS)}) VALUES ({", ".join(["%s"] * len(COLUMNS))})')
        started, batch = time.monotonic(), []
        for n, values in enumerate(rows(messages), 1):
            batch.append(values)
            if len(batch) == BATCH:
                _insert(database, insert, batch)
                batch = []
                if n % 1_000_000 == 0:
                    print(f"   {n:,} rows ({time.monotonic() - started:.0f} s)", flush=True)
        if batch:
            _insert(database, insert, batch)
        print(f"   indexes ({time.monotonic() - started:.0f} s)", flush=True)
    models.create_schema()              # the dropped indexes again, built in one sort each
    with database.connection_context():
        if isinstance(database, models.PostgresqlDatabase):
            database.execute_sql("ANALYZE message")
        else:
            database.execute_sql("ANALYZE")
    print(f"   built in {time.monotonic() - started:.0f} s", flush=True)


def _insert(database, sql: str, batch: list) -> None:
    if isinstance(database, models_postgres()):
        from psycopg2.extras import execute_values
        with database.atomic():
            execute_values(database.cursor(), sql.split(" VALUES ")[0] + " VALUES %s", batch, page_size=5000)
        return
    with database.atomic():
        database.cursor().executemany(sql.replace("%s", "?"), batch)


def models_postgres():
    from peewee import PostgresqlDatabase
    return PostgresqlDatabase


def sqlite_url(messages: int) -> tuple[str, bool]:
    """The cached SQLite file's URL, and whether it is there already."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"reading-{messages}.db"
    ready = OUT / f"reading-{messages}.ready"
    return f"sqlite:///{path}", ready.exists()


def mark_ready(messages: int) -> None:
    (OUT / f"reading-{messages}.ready").write_text(dt.datetime.now().isoformat())


# ---- measuring -------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench reading")
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--database-url", default=None, help="postgresql://...; default: a cached SQLite file")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    if args.database_url:
        url = postgres_schema_url(args.database_url)
        try:
            build(url, args.messages)
            if not args.build_only:
                refresh_summaries(url)
                measure(url, args.messages)
        finally:
            drop_schema(args.database_url, url)
        return
    url, ready = sqlite_url(args.messages)
    if not ready:
        path = Path(url.removeprefix("sqlite:///"))
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink(missing_ok=True)
        build(url, args.messages)
        mark_ready(args.messages)
    if args.build_only:
        return
    refresh_summaries(url)
    measure(url, args.messages)


def postgres_schema_url(url: str) -> str:
    """A fresh schema of its own on that server (search_path in the URL's options)."""
    import psycopg2
    schema = f"bench_reading_{os.getpid()}"
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def drop_schema(server_url: str, url: str) -> None:
    import psycopg2
    schema = url.rsplit("%3D", 1)[1]
    with psycopg2.connect(server_url) as connection, connection.cursor() as cursor:
        cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def refresh_summaries(url: str) -> None:
    """A round of the worker's stored summaries (the first one counts every mailing; later ones only
    what changed, so a rerun on the cached file is quick)."""
    from receiver import models, summaries
    from receiver.db import bind
    from receiver.settings import Settings

    settings = Settings.from_env(env_file=None, environ={"DATABASE_URL": url, "CALLBACK_TOKEN": "x" * 32, "API_TOKEN": API_TOKEN})
    database = bind(settings)
    models.create_schema()
    started = time.monotonic()
    with database.connection_context():
        counted = summaries.refresh()
    print(f"   stored summaries: {counted} mailings counted in {time.monotonic() - started:.1f} s", flush=True)


def measure(url: str, messages: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-reading-") as workdir:
        # METRICS_CACHE_SECONDS=0: every scrape reads the database, as the first one after the cache expires.
        server = Server("wsgi:app", Path(workdir), env={"DATABASE_URL": url, "PYTHONPATH": str(ROOT),
                                                         "METRICS_CACHE_SECONDS": "0"})
        with server:
            figures = [
                ("`/results`, all messages", timed(server, "/results", page=True)),
                ("`/results?mailing=...` (one mailing of 20,000)",
                 timed(server, "/results?mailing=c:spring-0001", page=True)),
                ("`GET /api/results/summary`, all messages", timed(server, "/api/results/summary")),
                ("`GET /api/results/summary?callbackData=...`",
                 timed(server, "/api/results/summary?callbackData=spring-0001")),
                ("`GET /api/results` first page", timed(server, "/api/results")),
                ("`/metrics`, one scrape", timed(server, "/metrics", token=False)),
            ]
            csv_lines, csv_seconds, csv_bytes = download(server, "/api/results.csv")
            json_lines, json_seconds, _ = download(server, "/api/results.json")
            since, until, window_rows = middle_tenth(messages)
            window_lines, window_seconds, _ = download(server, f"/api/results.csv?since={since}&until={until}")
        cli = {form: cli_export(url, Path(workdir), form) for form in ("csv", "json")}
    # Every row arrived: the CSV has a header line, the JSON array an opening and a closing line.
    for name, lines, expected in (("CSV", csv_lines, messages + 1), ("JSON", json_lines, messages + 2),
                                  ("CLI CSV", cli["csv"]["lines"], messages + 1),
                                  ("CLI JSON", cli["json"]["lines"], messages + 2),
                                  ("window CSV", window_lines, window_rows + 1)):
        if lines != expected:
            print(f"   !! {name}: {lines:,} lines, expected {expected:,}")
    csv_rows = json_rows = messages
    print(f"   {messages:,} messages, {url.split('?')[0].split(':')[0]}; {machine()}")
    print("   | what a user does | time |")
    print("   |---|---|")
    for label, seconds in figures:
        print(f"   | {label} | {seconds * 1000:.0f} ms (median of 5) |")
    print(f"   | `GET /api/results.csv`, everything ({csv_bytes / 1e6:.0f} MB) | {csv_seconds:.1f} s "
          f"({csv_rows / csv_seconds:,.0f} rows/s) |")
    print(f"   | `GET /api/results.json`, everything | {json_seconds:.1f} s ({json_rows / json_seconds:,.0f} rows/s) |")
    print(f"   | `GET /api/results.csv?since=...&until=...`, the middle tenth ({window_rows:,} rows) | "
          f"{window_seconds:.1f} s ({window_rows / window_seconds:,.0f} rows/s) |")
    for form, run in cli.items():
        print(f"   | `python -m receiver export --format {form}`, everything | {run['seconds']:.1f} s "
              f"({messages / run['seconds']:,.0f} rows/s), peak RSS {run['rss_mb']:.0f} MB |")


def middle_tenth(messages: int) -> tuple[str, str, int]:
    """(since, until, rows) of a time window over the middle tenth of the mailings (one a day)."""
    days = messages // MAILING
    first, last = days * 45 // 100, days * 55 // 100
    since, until = (f"{(EPOCH + dt.timedelta(days=day)).isoformat()}Z" for day in (first, last))
    return since, until, (last - first) * MAILING


def request(server: Server, path: str, token: bool = True, page: bool = False):
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {API_TOKEN}"
    if page:
        import base64
        headers["Authorization"] = "Basic " + base64.b64encode(f"bench:{API_TOKEN}".encode()).decode()
    return urllib.request.urlopen(urllib.request.Request(server.url + path, headers=headers), timeout=600)


def timed(server: Server, path: str, token: bool = True, page: bool = False, times: int = 5) -> float:
    """The median time of `times` requests, after one to warm up."""
    spent = []
    for _ in range(times + 1):
        started = time.perf_counter()
        with request(server, path, token=token, page=page) as answer:
            answer.read()
        spent.append(time.perf_counter() - started)
    return sorted(spent[1:])[times // 2]


def download(server: Server, path: str) -> tuple[int, float, int]:
    """(rows, seconds, bytes) of one whole download, read in 1 MB pieces and counted by line."""
    started = time.perf_counter()
    lines = size = 0
    with request(server, path) as answer:
        while piece := answer.read(1 << 20):
            lines += piece.count(b"\n")
            size += len(piece)
    return lines, time.perf_counter() - started, size


def cli_export(url: str, workdir: Path, form: str) -> dict:
    """`python -m receiver export --format FORM -o FILE`: its lines, seconds and peak RSS."""
    target = workdir / f"export.{form}"
    env = with_code({**os.environ, "DATABASE_URL": url, "CALLBACK_TOKEN": "x" * 32, "API_TOKEN": API_TOKEN})
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "receiver", "export", "--format", form, "-o", str(target)],
                               env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)         # this process's own rusage, not all children's
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"export --format {form} exited with {os.waitstatus_to_exitcode(status)}")
    with open(target, "rb") as handle:
        lines = sum(piece.count(b"\n") for piece in iter(lambda: handle.read(1 << 20), b""))
    target.unlink()
    return {"lines": lines, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}
