"""The read side over HTTP: health, metrics, the OpenAPI description, and behind the API token the
stored messages and the results (JSON pages and a streamed CSV; see receiver/results.py)."""
from __future__ import annotations

import datetime as dt
import functools
import hmac
import os
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from peewee import DatabaseError, InterfaceError, fn

from . import results
from .models import Event, Message, Meta
from .status import OUTCOMES, outcome_of_rank

bp = Blueprint("api", __name__)

SECRET_QUERY_NAMES = ("token", "api_token", "access_token", "apikey", "api_key")


def api_token_ok(presented: str | None) -> bool:
    expected = current_app.config["API_TOKEN"]
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def bearer_token() -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def require_api_token(view):
    """Let a request through only with `Authorization: Bearer <API_TOKEN>`."""
    @functools.wraps(view)
    def guarded(*args, **kwargs):
        if any(name in request.args for name in SECRET_QUERY_NAMES):
            # A token in a URL ends up in logs and browser history: refuse it even when right.
            return jsonify(error="token_in_query",
                           detail="send the token in the Authorization header, never in the URL"), 400
        if not api_token_ok(bearer_token()):
            return (jsonify(error="unauthorized", detail="send Authorization: Bearer <API_TOKEN>"), 401,
                    {"WWW-Authenticate": 'Bearer realm="twin24-receiver"'})
        return view(*args, **kwargs)
    return guarded


@bp.get("/healthz")
def healthz():
    try:
        # A real table: SELECT 1 answers even when the SQLite file is unreadable or the schema is gone.
        Meta.select(Meta.value).where(Meta.key == "schema_version").scalar()
    except (DatabaseError, InterfaceError) as error:
        return jsonify(status="unavailable", database=type(error).__name__), 503
    return jsonify(status="ok", database="ok")


MESSAGE_LIMIT = 1000


@bp.get("/api/messages")
@require_api_token
def messages():
    """The messages of one callbackData (or one message id), each with its status history."""
    callback_data = request.args.get("callbackData")
    message_id = request.args.get("id")
    if callback_data is None and message_id is None:
        return jsonify(error="missing_parameter", detail="give callbackData=... or id=..."), 400
    query = Message.select().order_by(Message.first_seen_at, Message.id).limit(MESSAGE_LIMIT)
    query = query.where(Message.callback_data == callback_data) if callback_data is not None \
        else query.where(Message.id == message_id)
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

def _filters_or_400(allowed=()):
    """(Filters, None) from the query string, or (None, a 400 answer naming the bad parameter)."""
    try:
        return results.Filters.from_args(request.args, allowed=allowed), None
    except results.FilterError as error:
        return None, (jsonify(error="bad_parameter", parameter=error.param, detail=error.detail), 400)


def _truthy(name: str) -> bool:
    return request.args.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@bp.get("/api/results")
@require_api_token
def results_page():
    """One page of results, oldest first; follow next_cursor for the next."""
    filters, refusal = _filters_or_400(allowed=("limit", "cursor"))
    if refusal:
        return refusal
    try:
        limit = int(request.args.get("limit", results.DEFAULT_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= results.MAX_LIMIT:
        return jsonify(error="bad_parameter", parameter="limit",
                       detail=f"a whole number from 1 to {results.MAX_LIMIT}"), 400
    try:
        found = results.page(filters, limit=limit, cursor=request.args.get("cursor") or None)
    except results.FilterError as error:
        return jsonify(error="bad_parameter", parameter=error.param, detail=error.detail), 400
    return jsonify(results=[results.row_json(row) for row in found.rows], next_cursor=found.next_cursor,
                   limit=limit)


@bp.get("/api/results.csv")
@require_api_token
def results_csv():
    """Every matching result as CSV, streamed (excel=1: with a BOM and formulas defused)."""
    filters, refusal = _filters_or_400(allowed=("excel",))
    if refusal:
        return refusal
    return csv_response(filters, excel=_truthy("excel"))


def csv_response(filters: results.Filters, excel: bool = False, filename: str = "results") -> Response:
    """A streamed CSV answer (also used by the results page's download link, named after the mailing)."""
    body = stream_with_context(results.csv_stream(filters, excel=excel))
    return Response(body, mimetype="text/csv", headers={
        "Content-Disposition": _attachment(filename[:100] + ".csv"),
        "Cache-Control": "private, no-store",
    })


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
    filters, refusal = _filters_or_400()
    if refusal:
        return refusal
    return jsonify(results.summarize(filters).as_json())


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
    """Counters from every process, and the backlog read from the database now.

    Open without a token, as Prometheus expects: it reveals counts, never data. Put it behind the
    reverse proxy's access rules if even counts are private (docs/results.md).
    """
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Under gunicorn every worker counts in its own files there; add them all up.
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(DatabaseCollector())
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})


class _Forward:
    """This process's own registry, inside a registry built for one scrape."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


class DatabaseCollector:
    """Gauges read from the database at scrape time: right whichever process or host is asked."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from .enrich import backlog
        from .models import STAGES, Rejected, TwinCall

        up = GaugeMetricFamily("receiver_database_up", "1 if the database answered this scrape.")
        try:
            report = backlog()
            outcomes = messages_by_outcome()
            events = Event.select().count()
            rejected = Rejected.select().count()
            calls = list(TwinCall.select())
        except (DatabaseError, InterfaceError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        stages = GaugeMetricFamily("receiver_messages", "Messages by enrichment stage.", labels=["stage"])
        for stage in STAGES:
            stages.add_metric([stage], report["stages"].get(stage, 0))
        yield stages
        by_outcome = GaugeMetricFamily(
            "receiver_messages_by_outcome",
            "Messages by where their status stands: delivered, failed (UNDELIVERED, ERROR, EXPIRED), "
            "in_flight (CREATED and the in-flight statuses) or other (statuses we do not know).",
            labels=["outcome"])
        for outcome in OUTCOMES:
            by_outcome.add_metric([outcome], outcomes.get(outcome, 0))
        yield by_outcome
        yield GaugeMetricFamily("receiver_enrichment_due", "Messages due for a TWIN lookup now.",
                                value=report["due"])
        yield GaugeMetricFamily("receiver_enrichment_oldest_due_seconds",
                                "How overdue the oldest due message is (0 when none is due).",
                                value=max(0.0, report["oldest_due_seconds"] or 0.0))
        yield GaugeMetricFamily("receiver_events_stored", "Status callbacks stored in the event table.",
                                value=events)
        yield GaugeMetricFamily("receiver_rejected_stored", "Refused callbacks kept in the rejected table.",
                                value=rejected)
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


def messages_by_outcome() -> dict[str, int]:
    """Messages per outcome, from one GROUP BY over the rank stored with each status."""
    counts: dict[str, int] = {}
    for rank, count in Message.select(Message.status_rank, fn.COUNT(Message.id)).group_by(
            Message.status_rank).tuples():
        outcome = outcome_of_rank(rank)
        counts[outcome] = counts.get(outcome, 0) + count
    return counts


def _unix(value) -> float:
    return value.replace(tzinfo=dt.UTC).timestamp()
