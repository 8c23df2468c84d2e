"""Storage: the tables, the `results` view, and creating and upgrading the schema.

Everything the receiver knows is in these tables, and they are meant to be read directly
(`sqlite3 data/receiver.db 'select * from results'`). All times are UTC. The engine the tables are
bound to (connections, the writers' queue, transactions) is receiver/db.py.
"""
from __future__ import annotations

from peewee import (
    BlobField,
    BooleanField,
    CharField,
    DateTimeField,
    FloatField,
    IntegerField,
    Model,
    PostgresqlDatabase,
    SqliteDatabase,
    TextField,
    fn,
)
from playhouse.migrate import SchemaMigrator, migrate

from .db import db, utcnow, write_transaction

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


MODELS: list[type[BaseModel]] = []     # every table, in the order declared (create_schema makes them)


def register(model: type[BaseModel]) -> type[BaseModel]:
    """Declare a model as one of the receiver's tables: add it to MODELS."""
    MODELS.append(model)
    return model


@register
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


@register
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


@register
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


@register
class Fact(BaseModel):
    """Small key/value facts the service keeps: generated tokens, the schema version."""
    key = CharField(primary_key=True, max_length=64)
    value = TextField()

    class Meta:
        table_name = "meta"


@register
class TwinCall(BaseModel):
    """The last TWIN error per endpoint, shared by every worker process (for `flask status`)."""
    endpoint = CharField(primary_key=True, max_length=32)
    last_error = TextField(null=True)
    last_error_at = DateTimeField(null=True)
    last_ok_at = DateTimeField(null=True)


@register
class PageSession(BaseModel):
    """A signed-in session of the results page (receiver/pages.py). The cookie holds a random id and
    this table only its hash; signing out deletes the row, so a copied cookie dies with it."""
    id_hash = CharField(primary_key=True, max_length=64)       # sha256 hex of the cookie's id
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)


# --- Sending through the receiver (receiver/sending.py, docs/sending.md) ---------------------------
@register
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


@register
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


# --- Forwarding results to the operator's systems (receiver/forwarding.py) -------------------------
@register
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


@register
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


@register
class DeliveryAttempt(BaseModel):
    """Every POST of a delivery: what the target answered (or the error) and how long it took."""
    delivery = IntegerField(column_name="delivery_id", index=True)
    at = DateTimeField(default=utcnow)
    status_code = IntegerField(null=True)
    error = TextField(null=True)
    seconds = FloatField(null=True)


# --- Stored summaries of the mailings (receiver/summaries.py, docs/results.md) ----------------------
@register
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


# --- The TWIN call budget (receiver/callbudget.py) --------------------------------------------------
@register
class TwinCallSlot(BaseModel):
    """One TWIN call reserved before it was made: the rows of the last minute are what every worker
    process has spent of TWIN24_MAX_CALLS_PER_MINUTE."""
    at = DateTimeField(index=True)
    endpoint = CharField(max_length=32)


# The `results` view: one row per message, these columns in this order (`select * from results`,
# docs/results.md), each read from a Message field. The exports (receiver/results.py) give the same
# columns from this mapping, in an order of their own.
RESULTS_COLUMNS = {
    "message_id": Message.id,
    "callback_data": Message.callback_data,
    "phone": Message.phone,
    "status": Message.status,
    "chat_id": Message.chat_id,
    "result": Message.result,
    "stage": Message.stage,
    "given_up_reason": Message.given_up_reason,
    "status_code": Message.status_code,
    "bulk_id": Message.bulk_id,
    "destination_index": Message.destination_index,
    "session_status": Message.session_status,
    "bot_status": Message.bot_status,
    "first_seen_at": Message.first_seen_at,
    "delivered_at": Message.delivered_at,
    "chat_id_at": Message.chat_id_at,
    "result_at": Message.result_at,
    "last_seen_at": Message.last_seen_at,
}


def _view_column(name: str, field) -> str:
    column = f"m.{field.column_name}"
    return column if field.column_name == name else f"{column} AS {name}"


RESULTS_VIEW = ("\nCREATE VIEW results AS\nSELECT "
                + ",\n       ".join(_view_column(name, field) for name, field in RESULTS_COLUMNS.items())
                + "\nFROM message AS m\n")
SCHEMA_VERSION = "3"


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
            Fact.insert(key="schema_version", value=SCHEMA_VERSION).on_conflict(
                conflict_target=[Fact.key], update={Fact.value: SCHEMA_VERSION}).execute()


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
