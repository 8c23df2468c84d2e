"""The read side over HTTP: health, metrics, the OpenAPI description, and behind the API token the
stored messages and the results (JSON pages and a streamed CSV; see receiver/results.py)."""
from __future__ import annotations

import datetime as dt
import functools
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from peewee import DatabaseError, InterfaceError, SqliteDatabase, fn
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from . import health, results, summaries
from .auth import bearer_token, require_api_token, same_secret
from .db import ESTIMATE_ABOVE, db, row_count, utcnow
from .errors import ApiError, bad_parameter
from .forwarding import stats
from .models import STAGES, Event, Fact, Message, Rejected, TwinCall, callback_data_is
from .status import OUTCOMES, outcome_of, outcome_of_rank

bp = Blueprint("api", __name__)

@bp.get("/healthz")
def healthz():
    try:
        # A real table: SELECT 1 answers even when the SQLite file is unreadable or the schema is gone.
        Fact.select(Fact.value).where(Fact.key == "schema_version").scalar()
    except (DatabaseError, InterfaceError) as error:
        return jsonify(status="unavailable", database=type(error).__name__), 503
    return jsonify(status="ok", database="ok")


MESSAGE_LIMIT = 1000
MESSAGE_PARAMS = ("callbackData", "id")


@bp.get("/api/messages")
@require_api_token
def messages():
    """The messages of one callbackData or one message id (both: the message, if it has that
    callbackData), each with its status history."""
    for name in request.args:
        if name not in MESSAGE_PARAMS:
            raise bad_parameter(name, "unknown parameter; known: callbackData, id")
        if "\x00" in request.args[name]:     # nothing stored holds one, and PostgreSQL cannot compare it
            raise bad_parameter(name, "contains a NUL character")
    callback_data = request.args.get("callbackData")
    message_id = request.args.get("id")
    if callback_data is None and message_id is None:
        raise ApiError(400, "missing_parameter", "give callbackData=... or id=...")
    query = Message.select().order_by(Message.first_seen_at, Message.id).limit(MESSAGE_LIMIT)
    if callback_data is not None:
        query = query.where(callback_data_is(callback_data))
    if message_id is not None:
        query = query.where(Message.id == message_id)
    found = list(query)
    history = _history([m.id for m in found])
    return jsonify(messages=[message_json(m, history.get(m.id, [])) for m in found],
                   truncated=len(found) == MESSAGE_LIMIT)


def _history(message_ids: list[str]) -> dict[str, list[dict]]:
    by_message: dict[str, list[dict]] = {}
    for chunk_start in range(0, len(message_ids), 500):   # stay under SQLite's variable limit
        chunk = message_ids[chunk_start:chunk_start + 500]
        for event in Event.select().where(Event.message_id.in_(chunk)).order_by(Event.id):
            by_message.setdefault(event.message_id, []).append({
                "old_status": event.old_status, "new_status": event.new_status,
                "old_status_code": event.old_status_code, "new_status_code": event.new_status_code,
                "received_at": _iso(event.received_at),
            })
    return by_message


def message_json(message: Message, history: list[dict] | None = None) -> dict:
    document = {
        "id": message.id, "callback_data": message.callback_data, "phone": message.phone,
        "status": message.status, "status_code": message.status_code,
        "bulk_id": message.bulk_id, "group_id": message.group_id, "flow_id": message.flow_id,
        "destination_index": message.destination_index,
        "price": message.price, "part_count": message.part_count,
        "first_seen_at": _iso(message.first_seen_at), "last_seen_at": _iso(message.last_seen_at),
        "delivered_at": _iso(message.delivered_at),
        "stage": message.stage, "given_up_reason": message.given_up_reason,
        "chat_id": message.chat_id, "result": _json_or_none(message.result),
        "result_at": _iso(message.result_at),
    }
    if history is not None:
        document["history"] = history
    return document


def _json_or_none(text: str | None):
    return results.parse_result(text)     # a result that is not JSON is given as its text, not a 500


def _iso(value) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


# ---- results ------------------------------------------------------------------------------------

def _filters(allowed=()) -> results.Filters:
    """The Filters of the query string; a 400 naming the bad parameter for one it cannot read."""
    try:
        return results.Filters.from_args(request.args, allowed=allowed)
    except results.FilterError as error:
        raise bad_parameter(error.param, error.detail) from None


def _truthy(name: str) -> bool:
    return request.args.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@bp.get("/api/results")
@require_api_token
def results_page():
    """One page of results, oldest first; follow next_cursor for the next."""
    filters = _filters(allowed=("limit", "cursor"))
    try:
        limit = int(request.args.get("limit", results.DEFAULT_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= results.MAX_LIMIT:
        raise bad_parameter("limit", f"a whole number from 1 to {results.MAX_LIMIT}")
    try:
        found = results.page(filters, limit=limit, cursor=request.args.get("cursor") or None)
    except results.FilterError as error:
        raise bad_parameter(error.param, error.detail) from None
    return jsonify(results=[results.row_json(row) for row in found.rows], next_cursor=found.next_cursor,
                   limit=limit)


@bp.get("/api/results.csv")
@require_api_token
def results_csv():
    """Every matching result as CSV, streamed, with formulas defused (raw=1: as stored; excel=1: with a BOM)."""
    filters = _filters(allowed=("excel", "raw"))
    return csv_response(filters, excel=_truthy("excel"), raw=_truthy("raw"))


@bp.get("/api/results.json")
@require_api_token
def results_json():
    """Every matching result as one JSON array, streamed (a cut download lacks the closing `]`)."""
    filters = _filters()
    keep_alive = current_app.config.get("HEARTBEAT") or _no_heartbeat
    return stream_response(results.json_stream(filters, keep_alive=keep_alive), "application/json", "results.json")


def csv_response(filters: results.Filters, excel: bool = False, raw: bool = False,
                 filename: str = "results") -> Response:
    """A streamed CSV answer (also used by the results page's download link, named after the mailing).
    Its result.<field> columns come from the stored summaries when they cover the filters."""
    keep_alive = current_app.config.get("HEARTBEAT") or _no_heartbeat
    pieces = results.csv_stream(filters, excel=excel, raw=raw, keep_alive=keep_alive,
                                keys=summaries.result_keys(filters))
    return stream_response(pieces, "text/csv", filename[:100] + ".csv")


def stream_response(pieces, mimetype: str, filename: str) -> Response:
    """A streamed download, of any length: no Content-Length, so the server sends it chunked.

    Under gunicorn the stream calls the worker's heartbeat (HEARTBEAT, set by deploy/gunicorn.conf.py)
    with every chunk of rows, so an export of any size outlives the worker timeout. An error midway
    propagates: the server then drops the connection without the last chunk, so a client sees a broken
    download, never a short file that looks complete.
    """
    return Response(stream_with_context(pieces), mimetype=mimetype, headers={
        "Content-Disposition": _attachment(filename),
        "Cache-Control": "private, no-store",
    })


def _no_heartbeat() -> None:
    """Outside gunicorn (flask run, tests) nothing watches the worker."""


def _attachment(name: str) -> str:
    """Content-Disposition for any name: an ASCII fallback, and the real name per RFC 6266/5987."""
    name = "".join("_" if ch in '/\\"' or ord(ch) < 32 else ch for ch in name)
    stem, dot, extension = name.rpartition(".")
    fallback = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_. ") else "_" for ch in stem)
    fallback = (fallback if any(ch.isalnum() for ch in fallback) else "results") + dot + extension
    if fallback == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


@bp.get("/api/results/summary")
@require_api_token
def results_summary():
    """The funnel, statuses, stages and the distribution of the bot's answers for the filters."""
    filters = _filters()
    counted = summaries.summary(filters)
    return jsonify({**counted.summary.as_json(), "as_of": _iso(counted.as_of)})


# ---- the OpenAPI description --------------------------------------------------------------------

OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict:
    import yaml
    return yaml.safe_load(OPENAPI_FILE.read_text(encoding="utf-8"))


@bp.get("/api/openapi.json")
def openapi_json():
    """The OpenAPI description of this service (public: it describes, it reveals no data)."""
    return jsonify(openapi_document())


# ---- Prometheus ---------------------------------------------------------------------------------

@bp.get("/metrics")
def prometheus_metrics():
    """Counters from every process, and gauges read from the database (at most every
    METRICS_CACHE_SECONDS per process: each read counts whole tables).

    Open without a token, as Prometheus expects: it reveals counts, never data. With METRICS_TOKEN set
    it takes `Authorization: Bearer <METRICS_TOKEN>` (Prometheus: `authorization: {credentials: ...}`),
    whether it is reached through nginx or straight at gunicorn.
    """
    settings = current_app.config["SETTINGS"]
    if settings.metrics_token and not same_secret(bearer_token(), settings.metrics_token):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <METRICS_TOKEN>",
                       headers={"WWW-Authenticate": 'Bearer realm="twin24-receiver metrics"'})
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Under gunicorn every worker counts in its own files there; add them all up.
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(_database_collector(settings.metrics_cache_seconds))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _database_collector(seconds: float) -> CachedCollector:
    """This app's cached DatabaseCollector (one per process: gunicorn's workers each keep their own)."""
    cached = current_app.extensions.get("receiver_database_metrics")
    if cached is None:
        cached = current_app.extensions.setdefault("receiver_database_metrics",
                                                   CachedCollector(DatabaseCollector(), seconds))
    return cached


class CachedCollector:
    """A collector's metrics, collected at most once every `seconds` and given again until then.

    Every scrape of every Prometheus server, through every worker, would otherwise count the tables
    again. One scrape at a time collects (the others wait and take its result), so an expiry under a
    burst of scrapes costs one read of the database.
    """

    def __init__(self, collector, seconds: float):
        self.collector, self.seconds = collector, seconds
        self._lock = threading.Lock()
        self._families: list | None = None
        self._collected_at = 0.0

    def collect(self):
        with self._lock:
            now = time.monotonic()
            if self._families is None or now - self._collected_at >= self.seconds:
                self._families = list(self.collector.collect())
                self._collected_at = now
            return list(self._families)


class _Forward:
    """This process's own registry, inside a registry built for one scrape."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


class DatabaseCollector:
    """Gauges read from the database (not counted in this process): right whichever process or host
    is asked."""

    def collect(self):
        up = GaugeMetricFamily("receiver_database_up", "1 if the database answered this scrape.")
        try:
            stage_counts, outcomes, counted_at = messages_by_stage_and_outcome()
            report = health.due_now()
            events = stored_rows(Event)
            rejected = stored_rows(Rejected)
            calls = list(TwinCall.select())
            forwards = stats()
        except (DatabaseError, InterfaceError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from message_metrics(stage_counts, outcomes, counted_at)
        yield GaugeMetricFamily("receiver_enrichment_due", "Messages due for a TWIN lookup now.",
                                value=report["due"])
        yield GaugeMetricFamily("receiver_enrichment_oldest_due_seconds",
                                "How overdue the oldest due message is (0 when none is due).",
                                value=max(0.0, report["oldest_due_seconds"] or 0.0))
        yield GaugeMetricFamily("receiver_events_stored", "Status callbacks stored in the event table "
                                f"(past {ESTIMATE_ABOVE:,} rows an estimate: {ESTIMATE_HOW}).", value=events)
        yield GaugeMetricFamily("receiver_rejected_stored", "Refused callbacks kept in the rejected table "
                                f"(past {ESTIMATE_ABOVE:,} rows an estimate: {ESTIMATE_HOW}).", value=rejected)
        yield from twin_call_metrics(calls)
        yield from forward_metrics(forwards)


def message_metrics(stage_counts: dict, outcomes: dict, counted_at):
    """The messages' gauges: by enrichment stage and by outcome, and when they were counted."""
    stages = GaugeMetricFamily("receiver_messages", "Messages by enrichment stage (as of "
                               "receiver_results_counted_timestamp_seconds).", labels=["stage"])
    for stage in STAGES:
        stages.add_metric([stage], stage_counts.get(stage, 0))
    yield stages
    yield GaugeMetricFamily(
        "receiver_results_counted_timestamp_seconds",
        "When the message counts were made (Unix time): the start of the worker's last round of "
        "stored summaries, or this scrape when there is none yet.", value=_unix(counted_at))
    by_outcome = GaugeMetricFamily(
        "receiver_messages_by_outcome",
        "Messages by where their status stands: delivered, failed (UNDELIVERED, ERROR, EXPIRED), "
        "in_flight (CREATED and the in-flight statuses) or other (statuses we do not know).",
        labels=["outcome"])
    for outcome in OUTCOMES:
        by_outcome.add_metric([outcome], outcomes.get(outcome, 0))
    yield by_outcome


def twin_call_metrics(calls: list[TwinCall]):
    """When each TWIN endpoint last failed and last answered."""
    last_error = GaugeMetricFamily("receiver_twin_last_error_timestamp_seconds",
                                   "When a TWIN endpoint last failed (Unix time).", labels=["endpoint"])
    last_ok = GaugeMetricFamily("receiver_twin_last_ok_timestamp_seconds",
                                "When a TWIN endpoint last answered (Unix time).", labels=["endpoint"])
    for call in calls:
        if call.last_error_at:
            last_error.add_metric([call.endpoint], _unix(call.last_error_at))
        if call.last_ok_at:
            last_ok.add_metric([call.endpoint], _unix(call.last_ok_at))
    yield last_error
    yield last_ok


def forward_metrics(forwards: list[dict]):
    """The webhooks' gauges, per subscription (its id: a URL may hold a secret)."""
    deliveries = GaugeMetricFamily("receiver_forward_deliveries",
                                   "Webhook events by subscription and state (pending, delivered, dead).",
                                   labels=["subscription", "state"])
    oldest = GaugeMetricFamily("receiver_forward_oldest_pending_seconds",
                               "Age of a subscription's oldest pending webhook event (0 when none is pending).",
                               labels=["subscription"])
    for row in forwards:
        subscription = str(row["id"])
        for state in ("pending", "delivered", "dead"):
            deliveries.add_metric([subscription, state], row[state])
        oldest.add_metric([subscription], max(0.0, row["oldest_pending_seconds"] or 0.0))
    yield deliveries
    yield oldest


def messages_by_stage_and_outcome() -> tuple[dict[str, int], dict[str, int], dt.datetime]:
    """(messages per stage, messages per outcome, as of when): from the stored summaries once the
    worker has counted them (a scrape then costs the same at any size), else two GROUP BYs now."""
    stored = summaries.stored_tally(results.Filters())
    if stored is None:
        stages = dict(Message.select(Message.stage, fn.COUNT(Message.id)).group_by(Message.stage).tuples())
        return stages, messages_by_outcome(), utcnow()
    counted, as_of = stored
    outcomes: dict[str, int] = {}
    for status, count in counted.statuses.items():
        outcomes[outcome_of(status)] = outcomes.get(outcome_of(status), 0) + count
    return dict(counted.stages), outcomes, as_of


def messages_by_outcome() -> dict[str, int]:
    """Messages per outcome, from one GROUP BY over the rank stored with each status."""
    counts: dict[str, int] = {}
    for rank, count in Message.select(Message.status_rank, fn.COUNT(Message.id)).group_by(
            Message.status_rank).tuples():
        outcome = outcome_of_rank(rank)
        counts[outcome] = counts.get(outcome, 0) + count
    return counts


ESTIMATE_HOW = "PostgreSQL's statistics; on SQLite the span of its ids, which only grow and go oldest first"


def stored_rows(model) -> int:
    """How many rows the table holds, without counting a large one: COUNT(*) reads the whole table.
    db.row_count takes PostgreSQL's estimate; on SQLite rows are appended with growing ids and
    deleted oldest first (retention), so the span of the ids is the count, give or take the few a
    failed insert or an out-of-order prune leaves."""
    if isinstance(db.obj, SqliteDatabase):
        low, high = model.select(fn.MIN(model.id), fn.MAX(model.id)).tuples().get()
        if high is not None and high - low + 1 > ESTIMATE_ABOVE:
            return high - low + 1
    return row_count(model)


def _unix(value) -> float:
    return value.replace(tzinfo=dt.UTC).timestamp()
