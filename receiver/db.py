"""The database engine: which database the models use, how it is opened, and how writes are made.

`db` is the proxy every model is bound to (`bind` points it at the configured database). On SQLite,
writers take their turn in a queue of their own (`WriterQueue`, an flock beside the file) instead of
SQLite's busy handler, which polls with sleeps and left the lock idle under load; `write_transaction`
is how code writes. `Prepared` keeps the SQL of the callback path's statements built once.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from peewee import DatabaseError, DatabaseProxy, InterfaceError, PostgresqlDatabase, SqliteDatabase, Value, fn
from playhouse.db_url import connect as connect_url
from playhouse.pool import PooledDatabase

log = logging.getLogger(__name__)

db = DatabaseProxy()


def utcnow() -> dt.datetime:
    """Naive UTC, the form every timestamp column holds."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def earliest(column):
    """MIN(column) read back as the column's type: SQLite returns MIN() of a datetime as text unless told."""
    return fn.MIN(column).python_value(column.python_value)


def make_database(settings):
    """Open the database named by settings.database_url (not yet connected)."""
    url = settings.database_url
    if settings.is_sqlite:
        path = settings.sqlite_path         # Settings.check() refused a sqlite URL without one
        _private_file(Path(path))
        return QueuedSqliteDatabase(path, pragmas=sqlite_pragmas(settings), timeout=settings.sqlite_busy_timeout,
                                    check_same_thread=False)
    # A connection per thread, kept between requests (a pool): opening one (a server process,
    # authentication) takes longer than storing a callback. A connection is replaced after 5 minutes.
    pooled = url.replace("postgres://", "postgresql://", 1).replace("postgresql://", "postgresql+pool://", 1)
    return connect_url(pooled, stale_timeout=300)


def _private_file(path: Path) -> None:
    """Create the database's directory (0700) and file (0600) if missing: they hold the tokens, phone
    numbers and results. SQLite gives its -wal and -shm files the database file's mode, and so does
    the WriterQueue its lock file. What exists already is left as it is (the operator's choice)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass


def sqlite_pragmas(settings) -> dict:
    # WAL lets readers (the results page, exports) run beside the writer; the busy timeout makes
    # concurrent writers wait their turn instead of failing with "database is locked".
    return {
        "journal_mode": "wal",
        "synchronous": settings.sqlite_synchronous,
        "busy_timeout": int(settings.sqlite_busy_timeout * 1000),
        "foreign_keys": 1,
        # SQLite checkpoints (copies the WAL back into the database, with fsyncs) inside the COMMIT
        # that takes the WAL past this many pages (16 MB), while that writer holds its turn and the
        # next ones wait. The queued writers checkpoint after their turn (QueuedSqliteDatabase.write),
        # so this one is left with little to copy; it is also the backstop for writers that do not
        # queue, and what lets the WAL start over under a steady load.
        "wal_autocheckpoint": 4_000,
    }


class WriterQueue:
    """Writers to one SQLite file take their turn in the kernel's queue instead of SQLite's.

    SQLite admits one writer at a time and makes the others poll: a BEGIN IMMEDIATE that finds the
    database locked sleeps 1, 2, 5, 10... ms between tries, up to the busy timeout. A callback holds
    the lock for a fraction of a millisecond, so under load the lock sat free while the next writer
    slept. Here a writer first takes an flock(2) on a file beside the database, which the kernel
    hands to the next waiter the moment its holder lets go; SQLite's lock is then free.

    Only writers that use the queue are ordered by it. One that does not (the sqlite3 shell,
    another program) still meets SQLite's own lock, so nothing depends on the queue for
    correctness; if the file cannot be opened, writers just wait in SQLite as before. The kernel
    drops the flock of a process that dies. The threads of a process share its open file, and an
    flock belongs to the open file, so they queue on a lock of their own first.
    """

    def __init__(self, path: str, database: str):
        self.path, self.database = path, database
        self._threads = threading.RLock()
        self._held = 0              # nesting depth of turn() in the thread holding _threads
        self._fd: int | None = None
        self._pid: int | None = None

    @contextmanager
    def turn(self):
        with self._threads:
            fd = self._file() if not self._held else None
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _file(self) -> int | None:
        if self._pid != os.getpid():
            # A forked child shares its parent's open file, and so its flock: it opens its own.
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._pid = None, os.getpid()
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self._mode())
            except OSError as error:
                log.warning("SQLite writers will wait in its busy handler: cannot open %s (%s)",
                            self.path, error.strerror)
        return self._fd

    def _mode(self) -> int:
        """The database file's permissions, as SQLite gives its -wal and -shm files."""
        try:
            return os.stat(self.database).st_mode & 0o666
        except OSError:
            return 0o600


class QueuedSqliteDatabase(SqliteDatabase):
    """SQLite whose writers (write_transaction) queue in a WriterQueue beside the database file, and
    checkpoint the WAL once their turn is over, so that the next writer never waits for the fsyncs."""

    CHECKPOINT_EVERY = 100      # write transactions of a process between its checkpoints (~900 pages)

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.writers = WriterQueue(f"{path}-writers.lock", path)
        self._writes = 0

    def _connect(self):
        # Opening sets the pragmas, and turning a new file to WAL needs it alone for a moment: a
        # process that opens it at the same instant (gunicorn starts its workers together, each
        # creating the schema) can get "database is locked" without SQLite waiting (seen once in
        # CI). Such an open is tried again, within the busy timeout.
        deadline = time.monotonic() + (self._timeout or 0)
        while True:
            try:
                return super()._connect()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def write(self):
        with self.writers.turn(), self.atomic("IMMEDIATE"):
            yield
        self._writes += 1
        if self._writes % self.CHECKPOINT_EVERY == 0 and not self.in_transaction():
            self._checkpoint()

    def _checkpoint(self) -> None:
        # PASSIVE copies what no reader still needs and never waits; the write before it is already
        # committed, so a checkpoint that fails (a full disk) is only reported.
        try:
            self.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except (DatabaseError, InterfaceError) as error:
            log.warning("WAL checkpoint failed: %s", error)


def bind(settings):
    """Point the models at the configured database and return it."""
    if isinstance(db.obj, PooledDatabase):
        db.obj.close_all()          # the pool of a database this process used before (tests)
    database = make_database(settings)
    db.initialize(database)
    return database


def connect_for_request() -> None:
    db.connect(reuse_if_open=True)


def release_after_request(_exc=None) -> None:
    # SQLite connections stay open with their thread (opening one costs more than a request);
    # pooled PostgreSQL connections go back to the pool.
    if not isinstance(db.obj, SqliteDatabase) and not db.is_closed():
        db.close()


def write_transaction():
    """A transaction that will write. On SQLite it takes the write lock at BEGIN: a transaction
    that reads first and writes later cannot wait for the lock (SQLite answers "database is
    locked" at once when another writer committed in between), while BEGIN IMMEDIATE waits its
    turn, first in the writers' queue (QueuedSqliteDatabase), then under the busy timeout."""
    database = db.obj
    if isinstance(database, QueuedSqliteDatabase):
        return database.write()
    if isinstance(database, SqliteDatabase):
        return database.atomic("IMMEDIATE")
    return database.atomic()


class Slot:
    """A named hole in the parameters of a `Prepared` statement."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def slot(name: str) -> Value:
    """Where a `Prepared` statement takes the value called `name` at each execution."""
    return Value(Slot(name), converter=False, unpack=False)


class Prepared:
    """A statement whose SQL peewee builds once per database kind and variant, then runs with new values.

    The callback path runs the same two statements for every callback, and building their SQL (a
    CASE for each status column) costs several times what SQLite takes to run it. `build(variant)`
    returns the peewee query, written with `slot(name)` where the values go; values are passed as
    the driver takes them (str, int, float, datetime, None).
    """

    def __init__(self, build):
        self.build = build
        self._compiled: dict = {}

    def execute(self, values: dict, variant=None):
        key = (type(db.obj), variant)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(variant)
        sql, params, slots = compiled
        params = params.copy()
        for position, name in slots:
            params[position] = values[name]
        return db.execute_sql(sql, params)

    def _compile(self, variant) -> tuple[str, list, tuple]:
        """(SQL, its parameters with None where a slot goes, (position, slot name) of each slot)."""
        sql, params = self.build(variant).sql()
        if isinstance(db.obj, SqliteDatabase):
            sql, params = _numbered(sql, params)
        slots = tuple((position, p.name) for position, p in enumerate(params) if isinstance(p, Slot))
        return sql, [None if isinstance(p, Slot) else p for p in params], slots


def _numbered(sql: str, params: list) -> tuple[str, list]:
    """SQLite's `?` placeholders as `?N`, one N per distinct slot or constant: the upsert names its
    time and status values many times over, and each parameter is converted and bound once."""
    distinct: dict = {}
    parts = sql.split("?")
    if len(parts) != len(params) + 1:       # a "?" that is no placeholder: keep the SQL as it was
        return sql, params
    numbered = [parts[0]]
    for param, part in zip(params, parts[1:], strict=True):
        key = ("slot", param.name) if isinstance(param, Slot) else ("value", type(param), param)
        number = distinct.setdefault(key, len(distinct) + 1)
        numbered.append(f"?{number}{part}")
    values = [Slot(key[1]) if key[0] == "slot" else key[2] for key in distinct]
    return "".join(numbered), values


# Above this many rows, row_count() takes PostgreSQL's estimate instead of counting.
ESTIMATE_ABOVE = 100_000


def row_count(model) -> int:
    """How many rows the model's table holds. On PostgreSQL, once its statistics (kept by autovacuum)
    put the table past ESTIMATE_ABOVE rows, their estimate: COUNT(*) there reads the whole table."""
    if isinstance(db.obj, PostgresqlDatabase):
        estimate = db.execute_sql("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
                                  (model._meta.table_name,)).fetchone()
        if estimate and estimate[0] > ESTIMATE_ABOVE:
            return int(estimate[0])
    return model.select().count()
