"""Storage: the peewee models, the database they live in, and the `results` view.

Everything the receiver knows is in these tables, and they are meant to be read directly
(`sqlite3 data/receiver.db 'select * from results'`). All times are UTC.
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

from peewee import (
    BlobField,
    BooleanField,
    CharField,
    DatabaseError,
    DatabaseProxy,
    DateTimeField,
    FloatField,
    IntegerField,
    InterfaceError,
    Model,
    PostgresqlDatabase,
    SqliteDatabase,
    TextField,
    Value,
    fn,
)
from playhouse.db_url import connect as connect_url
from playhouse.migrate import SchemaMigrator, migrate
from playhouse.pool import PooledDatabase

log = logging.getLogger(__name__)

db = DatabaseProxy()


def utcnow() -> dt.datetime:
    """Naive UTC, the form every timestamp column holds."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# Enrichment stages of a message (Message.stage).
STAGE_NONE = "none"          # not delivered (yet): nothing to look up
STAGE_CHAT_ID = "chat_id"    # delivered: looking for its chat session id
STAGE_RESULT = "result"      # session known: waiting for the bot's result
STAGE_DONE = "done"          # result stored
STAGE_GIVEN_UP = "given_up"  # past the horizon; given_up_reason says why
STAGES = (STAGE_NONE, STAGE_CHAT_ID, STAGE_RESULT, STAGE_DONE, STAGE_GIVEN_UP)
ACTIVE_STAGES = (STAGE_CHAT_ID, STAGE_RESULT)


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class Message(BaseModel):
    """One TWIN message (one destination of a send), with its current status and what enrichment found."""
    id = CharField(primary_key=True, max_length=128)          # TWIN's message id
    callback_data = TextField(null=True)       # verbatim, opaque; indexed with first_seen_at (below)
    bulk_id = CharField(null=True, max_length=128)           # indexed with first_seen_at (Meta)
    group_id = CharField(null=True, max_length=128)
    flow_id = CharField(null=True, max_length=128)
    # Known only when the message was sent through the receiver (receiver/sending.py).
    phone = CharField(null=True, max_length=32)
    messenger_user_id = CharField(null=True, max_length=128)
    variables = TextField(null=True)                           # JSON object
    destination_index = IntegerField(null=True)
    send_id = IntegerField(null=True)                          # indexed where set (below)
    sent_at = DateTimeField(null=True)

    status = CharField(max_length=64, default="CREATED")
    status_code = IntegerField(null=True)
    status_rank = IntegerField(default=0)
    status_at = DateTimeField(null=True)                       # when the current status was learned
    price = FloatField(null=True)
    part_count = IntegerField(null=True)
    first_seen_at = DateTimeField(default=utcnow)
    last_seen_at = DateTimeField(default=utcnow)
    delivered_at = DateTimeField(null=True)                    # when DELIVERED was first learned

    # Enrichment: the chat session (providerMessageId) and the bot's result.
    stage = CharField(max_length=16, default=STAGE_NONE)
    next_check_at = DateTimeField(null=True)
    attempts = IntegerField(default=0)
    lease_until = DateTimeField(null=True)
    last_error = TextField(null=True)
    given_up_reason = TextField(null=True)
    chat_id = CharField(null=True, max_length=128)             # indexed where set (below)
    chat_id_at = DateTimeField(null=True)
    session = TextField(null=True)                             # the session item as TWIN gave it (JSON)
    session_started_at = DateTimeField(null=True)              # its startedAt, by TWIN's clock
    session_status = CharField(null=True, max_length=64)
    bot_status = CharField(null=True, max_length=64)
    result = TextField(null=True)                              # dialogResultsFromBotJson (JSON)
    result_at = DateTimeField(null=True)

    class Meta:
        indexes = (
            (("stage", "next_check_at"), False),          # the queue: what is due, per stage
            # Results in a stable order (keyset pages, exports), whole or per mailing.
            (("first_seen_at", "id"), False),
            (("bulk_id", "first_seen_at", "id"), False),
        )


# The index that finds a mailing's messages in order (results, exports, /api/messages). On SQLite it holds
# the whole callback_data: SQLite has no limit on a key, and the results page's list of mailings groups by
# it. A PostgreSQL btree key holds at most about 2,700 bytes and a callbackData may have TWIN's 10,240, so
# there it holds the first CALLBACK_DATA_PREFIX characters (at most 1 KB of UTF-8): callback_data_is()
# finds a mailing's rows by that prefix, then compares the whole value.
CALLBACK_DATA_PREFIX = 256
CALLBACK_DATA_INDEX = {
    SqliteDatabase: ("message_callback_data_first_seen_at_id", '"callback_data"'),
    PostgresqlDatabase: ("message_callback_data_prefix", f'left("callback_data", {CALLBACK_DATA_PREFIX})'),
}


def callback_data_index() -> tuple[str, str]:
    """(name, leading expression) of the callback_data index on this database."""
    return next(index for kind, index in CALLBACK_DATA_INDEX.items() if isinstance(db.obj, kind))


def callback_data_is(value: str):
    """WHERE message.callback_data = value, in the form this database's index answers."""
    equal = Message.callback_data == value
    if isinstance(db.obj, PostgresqlDatabase):
        return (fn.LEFT(Message.callback_data, CALLBACK_DATA_PREFIX) == value[:CALLBACK_DATA_PREFIX]) & equal
    return equal


# Every index is written on every insert, and a callback is one insert: an index over a column that most
# rows leave empty (a message that only came by callback has no send; it has no chat id until enrichment
# finds one) covers only the rows that have a value.
SPARSE_COLUMNS = ("send_id", "chat_id")
for _column in SPARSE_COLUMNS:
    _field = getattr(Message, _column)
    Message.add_index(Message.index(_field, where=_field.is_null(False), name=f"message_{_column}"))


class Event(BaseModel):
    """Every status callback as received. Exact repeats (same message, old and new status) once: the
    unique transition key below, which also finds a message's events."""
    message_id = CharField(max_length=128)
    old_status = CharField(null=True, max_length=64)
    new_status = CharField(max_length=64)
    old_status_code = IntegerField(null=True)
    new_status_code = IntegerField(null=True)
    price = FloatField(null=True)
    part_count = IntegerField(null=True)
    callback_data = TextField(null=True)
    received_at = DateTimeField(default=utcnow)               # rows are in the order received (id)
    remote_addr = CharField(null=True, max_length=64)
    content_type = CharField(null=True, max_length=128)
    raw = TextField()                                          # the body exactly as it came


Event.add_index(Event.index(Event.message_id, fn.COALESCE(Event.old_status, ""), Event.new_status,
                            unique=True, name="event_transition"))


class Rejected(BaseModel):
    """A callback we refused, kept so that nothing is lost silently and an operator can replay it."""
    received_at = DateTimeField(default=utcnow, index=True)
    reason = CharField(max_length=64)                          # from a small vocabulary (callbacks.py)
    detail = TextField(null=True)
    remote_addr = CharField(null=True, max_length=64)
    method = CharField(null=True, max_length=16)
    content_type = CharField(null=True, max_length=128)
    content_length = IntegerField(null=True)
    body = BlobField(null=True)                                # at most REJECTED_BODY_CAP bytes
    body_truncated = BooleanField(default=False)
    # `python -m receiver rejected replay` (receiver/rejected.py): its last replay, and what came of it.
    replayed_at = DateTimeField(null=True)
    replay_outcome = CharField(null=True, max_length=255)


class Meta(BaseModel):
    """Small key/value facts the service keeps: generated tokens, the schema version."""
    key = CharField(primary_key=True, max_length=64)
    value = TextField()


class TwinCall(BaseModel):
    """The last TWIN error per endpoint, shared by every worker process (for `flask status`)."""
    endpoint = CharField(primary_key=True, max_length=32)
    last_error = TextField(null=True)
    last_error_at = DateTimeField(null=True)
    last_ok_at = DateTimeField(null=True)


class PageSession(BaseModel):
    """A signed-in session of the results page (receiver/pages.py). The cookie holds a random id and
    this table only its hash; signing out deletes the row, so a copied cookie dies with it."""
    id_hash = CharField(primary_key=True, max_length=64)       # sha256 hex of the cookie's id
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)


MODELS = [Message, Event, Rejected, Meta, TwinCall, PageSession]

RESULTS_VIEW = """
CREATE VIEW results AS
SELECT m.id AS message_id,
       m.callback_data,
       m.phone,
       m.status,
       m.chat_id,
       m.result,
       m.stage,
       m.given_up_reason,
       m.status_code,
       m.bulk_id,
       m.destination_index,
       m.session_status,
       m.bot_status,
       m.first_seen_at,
       m.delivered_at,
       m.chat_id_at,
       m.result_at,
       m.last_seen_at
FROM message AS m
"""
SCHEMA_VERSION = "3"


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


def create_schema() -> None:
    """Create tables, indexes and the results view if missing. Safe to run from many processes at once."""
    with db.connection_context():
        with _schema_lock():
            retire_replaced_indexes()
            db.create_tables(MODELS, safe=True)
            add_missing_columns()
            create_callback_data_index()
            if "results" not in [view.name for view in db.get_views()]:
                db.execute_sql(RESULTS_VIEW)
            Meta.insert(key="schema_version", value=SCHEMA_VERSION).on_conflict(
                conflict_target=[Meta.key], update={Meta.value: SCHEMA_VERSION}).execute()


def add_missing_columns() -> None:
    """Bring a database made by an earlier version up to date: add the columns it lacks.

    Every column added after the first release is nullable or has a default, so an upgrade is
    additive and keeps every row; anything else would need a written migration.
    """
    migrator = SchemaMigrator.from_database(db.obj)
    for model in MODELS:
        table = model._meta.table_name
        present = {column.name for column in db.get_columns(table)}
        missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
        for field in missing:
            if not field.null and field.default is None:
                raise RuntimeError(f"{table}.{field.column_name} is missing and cannot be added by itself")
            migrate(migrator.add_column(table, field.column_name, field))


def create_callback_data_index() -> None:
    """The callback_data index of this database (CALLBACK_DATA_INDEX), if missing."""
    name, leading = callback_data_index()
    db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{name}" ON "message" ({leading}, "first_seen_at", "id")')


def retire_replaced_indexes() -> None:
    """Bring an older database towards this schema (create_tables() then builds what replaces these):

    - event.dedup_key (a unique column) and the event.message_id index give way to the unique
      transition key `event_transition`; the old key held the same three values, so every stored
      row satisfies the new one. The event.received_at index goes: events are pruned in id order;
    - the message.send_id and message.chat_id indexes over every row give way to indexes of the
      same names over the rows that have a value;
    - schema 3, on PostgreSQL: the index over the whole callback_data, which cannot hold a long one,
      gives way to `message_callback_data_prefix` (create_callback_data_index).
    """
    event_indexes = {index.name for index in db.get_indexes("event")}
    for name in ("event_dedup_key", "event_message_id", "event_received_at"):
        if name in event_indexes:
            db.execute_sql(f'DROP INDEX "{name}"')
    if "dedup_key" in {column.name for column in db.get_columns("event")}:
        migrate(SchemaMigrator.from_database(db.obj).drop_column("event", "dedup_key"))
    message_indexes = {index.name: index.sql or "" for index in db.get_indexes("message")}
    whole = CALLBACK_DATA_INDEX[SqliteDatabase][0]
    if callback_data_index()[0] != whole and whole in message_indexes:
        db.execute_sql(f'DROP INDEX "{whole}"')
    for column in SPARSE_COLUMNS:
        sql = message_indexes.get(f"message_{column}")
        if sql is not None and " WHERE " not in sql.upper():
            db.execute_sql(f'DROP INDEX "message_{column}"')


class _schema_lock:
    """Serialise schema creation: gunicorn starts several workers that all run create_app()."""

    def __enter__(self):
        self.txn = write_transaction()
        self.txn.__enter__()
        if isinstance(db.obj, PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(2402402401)")
        return self

    def __exit__(self, *exc):
        return self.txn.__exit__(*exc)


def reset_for_tests() -> None:
    """Drop everything (used by test fixtures on throw-away databases only)."""
    with db.connection_context():
        db.execute_sql("DROP VIEW IF EXISTS results")
        db.drop_tables(MODELS, safe=True)


# --- Sending through the receiver (receiver/sending.py, docs/sending.md) ---------------------------
class Send(BaseModel):
    """One mailing sent through the receiver. `key` names it (chat settings + callbackData), so a rerun
    finds it; `lease_*` is the claim of the one process sending it right now; `queued` > 0 asks the
    worker to send its pending rows (POST /api/sends)."""
    key = CharField(max_length=64, unique=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    source = CharField(null=True, max_length=255)             # the file name, or "api"
    chat = TextField()                                         # channels.chat as sent (JSON)
    callback_data = TextField(null=True)
    total = IntegerField(default=0)                            # outbox rows
    batches = IntegerField(default=0)                          # requests made so far
    lease_owner = CharField(null=True, max_length=64)
    lease_until = DateTimeField(null=True)
    # POST /api/sends records the work, the worker does it (sending.send_pending) with these settings.
    queued = IntegerField(default=0)                           # requests not yet taken up by a worker
    batch_size = IntegerField(null=True)
    callback_url = TextField(null=True)
    failure = TextField(null=True)                             # why the last run stopped, if it did
    failure_kind = CharField(null=True, max_length=16)         # rejected / not_taken / unknown
    options = TextField(null=True)         # the message object's send options (sendAt, ...) as sent (JSON)


class Outbox(BaseModel):
    """One destination of a send: pending -> in_flight -> sent | refused | rejected | not_taken | unknown."""
    send = IntegerField(column_name="send_id", index=True)    # Send.id
    row_index = IntegerField()                                 # 0-based position in the input
    line = IntegerField()                                      # the input's line (or item number)
    # The destination's identity in its send: the phone, or "muid:<messengerUserId>" for a destination
    # addressed without one (destinations.destination_key), so (send, phone) stays its unique key.
    phone = CharField(max_length=32)
    messenger_user_id = CharField(null=True, max_length=128)
    external_id = CharField(null=True, max_length=128)        # the destination's externalId, as sent
    variables = TextField(null=True)                           # JSON object
    state = CharField(max_length=16, default="pending")
    batch = IntegerField(null=True)                            # which request carried it
    attempts = IntegerField(default=0)
    message_id = CharField(null=True, max_length=128, index=True)
    error = TextField(null=True)
    answer = TextField(null=True)                              # TWIN's answer item (JSON), kept first
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("send", "phone"), True), (("send", "state"), False))


MODELS.extend([Send, Outbox])


# --- Forwarding results to the operator's systems (receiver/forwarding.py) -------------------------
class Subscription(BaseModel):
    """A target URL and the events it wants, signed the Standard Webhooks way with `secret`."""
    url = TextField()
    secret = TextField()                                       # "whsec_<base64>", as standardwebhooks takes it
    previous_secret = TextField(null=True)                     # while set, both signatures are sent (rotation)
    events = TextField(default="message.result,message.given_up")   # comma list
    filter_callback_data = TextField(null=True)                # exact callbackData
    filter_callback_data_prefix = TextField(null=True)
    filter_bulk_id = TextField(null=True)
    from_settings = BooleanField(default=False)                # the one FORWARD_URL made (ensure_settings_subscription)
    failing_since = DateTimeField(null=True)                   # first failure of the current run of failures
    paused_at = DateTimeField(null=True)                       # failing for FORWARD_PAUSE_AFTER: probed only
    paused_reason = TextField(null=True)
    disabled_at = DateTimeField(null=True)                     # the target answered 410 Gone
    created_at = DateTimeField(default=utcnow)


class Delivery(BaseModel):
    """The outbox: one event for one subscription, written in the transaction of the change that caused
    it. id is the order of events; event_id the receiver's idempotency key (a replay keeps it)."""
    event_id = CharField(max_length=64, unique=True)
    subscription = IntegerField(column_name="subscription_id")
    message_id = CharField(max_length=128)
    event_type = CharField(max_length=32)
    payload = TextField()                                      # the JSON body, exactly as signed and sent
    state = CharField(max_length=16, default="pending")        # pending / delivered / dead
    attempts = IntegerField(default=0)
    next_attempt_at = DateTimeField(null=True)
    lease_owner = CharField(null=True, max_length=64)
    lease_until = DateTimeField(null=True)
    last_status = IntegerField(null=True)
    last_error = TextField(null=True)
    created_at = DateTimeField(default=utcnow)                 # the event's time
    queued_at = DateTimeField(default=utcnow)                  # FORWARD_MAX_AGE counts from here (a retry resets it)
    delivered_at = DateTimeField(null=True)

    class Meta:
        indexes = (
            (("state", "next_attempt_at"), False),             # what is due
            (("subscription", "message_id", "state"), False),  # the oldest pending of a message goes first
        )


class DeliveryAttempt(BaseModel):
    """Every POST of a delivery: what the target answered (or the error) and how long it took."""
    delivery = IntegerField(column_name="delivery_id", index=True)
    at = DateTimeField(default=utcnow)
    status_code = IntegerField(null=True)
    error = TextField(null=True)
    seconds = FloatField(null=True)


MODELS.extend([Subscription, Delivery, DeliveryAttempt])


# --- Stored summaries of the mailings (receiver/summaries.py, docs/results.md) ----------------------
class MailingSummary(BaseModel):
    """The tally (results.Tally) of one mailing, one callbackData or one bulkId, as the worker last
    counted it; the results page and the summary add these up instead of reading every message."""
    key = CharField(primary_key=True, max_length=80)           # kind + ":" + sha256 of the value
    kind = CharField(max_length=16)                            # "callbackData" or "bulkId"
    value = TextField()
    messages = IntegerField()
    open = IntegerField()            # messages enrichment may still change without a callback
    last_first_seen_at = DateTimeField(null=True)              # the newest message's first_seen_at
    tally = TextField()                                        # results.Tally.as_json(), as JSON
    counted_at = DateTimeField()                               # when its count began

    class Meta:
        indexes = ((("kind", "last_first_seen_at"), False),)


MODELS.append(MailingSummary)


# --- The TWIN call budget (receiver/callbudget.py) --------------------------------------------------
class TwinCallSlot(BaseModel):
    """One TWIN call reserved before it was made: the rows of the last minute are what every worker
    process has spent of TWIN24_MAX_CALLS_PER_MINUTE."""
    at = DateTimeField(index=True)
    endpoint = CharField(max_length=32)


MODELS.append(TwinCallSlot)
