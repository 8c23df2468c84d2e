"""The webhooks over HTTP, behind the API token: GET /api/forwards (per subscription: pending, delivered,
dead, the oldest pending age, why it is paused), POST /api/forwards/retry (dead events back to pending)
and POST /api/forwards/replay (delivered or dead events sent again, with the same event ids).

Changing what is delivered is an operator's action, like reading the results: API_TOKEN, never the
SEND_TOKEN of mailings. See docs/forwarding.md.
"""
from __future__ import annotations

import datetime as dt
import re

from flask import Blueprint, jsonify

from . import forwarding
from .api import openapi_document
from .auth import require_api_token
from .errors import ApiError, json_body
from .models import Delivery
from .settings import masked_url

bp = Blueprint("forwards_api", __name__)

MAX_IDS = 1000                  # event or message ids per request
MAX_ID = 2**63 - 1              # a subscription id is a 64-bit integer at most
RETRY_FIELDS = ("ids", "subscription", "since", "until")
JSON_OBJECT = "send a JSON object (Content-Type: application/json)"   # what a 415 asks for
REPLAY_FIELDS = ("subscription", "since", "until", "messages")


class Refusal(ApiError):
    """A body this API does not take (400): `field` names what is wrong."""

    def __init__(self, field: str | None, detail: str):
        super().__init__(400, "bad_parameter", detail, parameter=field)


@bp.get("/api/forwards")
@require_api_token
def forwards():
    """Every subscription with its delivery counts (the same as `python -m receiver forwards list`)."""
    return jsonify(subscriptions=[subscription_json(row) for row in forwarding.stats()])


def subscription_json(row: dict) -> dict:
    """A stats() row for JSON: the URL without a password, the age in seconds (null: nothing pending)."""
    age = row.get("oldest_pending_seconds")
    return {"id": row["id"], "url": masked_url(row["url"]), "events": list(row["events"]),
            "pending": row["pending"], "delivered": row["delivered"], "dead": row["dead"],
            "oldest_pending_seconds": None if age is None else round(max(0.0, age), 3),
            "paused": row["paused"], "disabled": row["disabled"], "paused_reason": row["paused_reason"]}


@bp.post("/api/forwards/retry")
@require_api_token
def retry():
    """Dead events back to pending, to be delivered again from their first try."""
    filters = read_filters(json_body(JSON_OBJECT), RETRY_FIELDS)
    if "ids" in filters:
        filters["ids"] = _delivery_ids(filters["ids"])
    return jsonify(retried=forwarding.retry_dead(**filters))


@bp.post("/api/forwards/replay")
@require_api_token
def replay():
    """Delivered events sent again, each with its same event id (a target that deduplicates sees each once;
    dead ones go through /retry)."""
    filters = read_filters(json_body(JSON_OBJECT), REPLAY_FIELDS)
    filters["message_ids"] = filters.pop("messages", None)
    return jsonify(replayed=forwarding.replay(**filters))


def _delivery_ids(event_ids: list[str]) -> list[int]:
    """The deliveries of these event ids (evt_...); an id no event has matches nothing."""
    found = []
    for start in range(0, len(event_ids), 500):         # stay under SQLite's variable limit
        chunk = event_ids[start:start + 500]
        found += [row.id for row in Delivery.select(Delivery.id).where(Delivery.event_id.in_(chunk))]
    return found


def read_filters(body, known: tuple[str, ...]) -> dict:
    """The checked filters of a body; a Refusal for anything the OpenAPI document does not allow."""
    if not isinstance(body, dict):
        raise Refusal(None, "the body must be a JSON object")
    for name in body:
        if name not in known:
            raise Refusal(name, f"unknown field; known: {', '.join(known)}")
    if not body:
        raise Refusal(None, f"say which events: give at least one of {', '.join(known)}")
    filters: dict = {}
    for name in ("ids", "messages"):
        if name in body:
            filters[name] = _ids(name, body[name])
    if "subscription" in body:
        value = body["subscription"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ID:
            raise Refusal("subscription", f"a subscription id: a whole number from 1 to {MAX_ID}")
        filters["subscription"] = value
    for name in ("since", "until"):
        if name in body:
            filters[name] = _time(name, body[name])
    return filters


def _ids(name: str, value) -> list[str]:
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_IDS
            or not all(isinstance(item, str) and item and "\x00" not in item for item in value)):
        raise Refusal(name, f"a list of 1 to {MAX_IDS} non-empty strings (without NUL characters)")
    return value


def _time_pattern() -> str:
    """The forms of time the OpenAPI document promises to take (EventTime), and only those."""
    return openapi_document()["components"]["schemas"]["EventTime"]["pattern"]


def _time(name: str, value) -> dt.datetime:
    """Naive UTC, like the columns. A time whose UTC falls outside the years 1 to 9999 is taken as the
    earliest or latest time there is, rather than refused: it still says which events it means."""
    if not isinstance(value, str) or not re.search(_time_pattern(), value):
        raise Refusal(name, "an ISO 8601 date (YYYY-MM-DD) or date and time (YYYY-MM-DDTHH:MM[:SS[.ffffff]], "
                            "then Z or +HH:MM; UTC without one)")
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise Refusal(name, f"expected an ISO 8601 date or date-time, got {value!r}") from None
    if parsed.tzinfo is None:
        return parsed
    try:
        return parsed.astimezone(dt.UTC).replace(tzinfo=None)
    except OverflowError:
        return dt.datetime.min if parsed.year == 1 else dt.datetime.max
