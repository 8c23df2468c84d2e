"""Prometheus counters shared by the web processes and the worker.

Under gunicorn every worker is its own process: with PROMETHEUS_MULTIPROC_DIR set (deploy/ and
the run script set it), prometheus_client keeps each process's counts in files there and `/metrics`
adds them up. The enrichment backlog is read from the database at scrape time instead (api.py), so
it is right whichever process or machine asks.
"""
from prometheus_client import Counter

from .status import RANKS

CALLBACKS = Counter(
    "receiver_callbacks_total",
    "Status callbacks stored, by new status ('duplicate' for exact repeats, 'other' for unknown statuses).",
    ["status"])
CALLBACK_FIELDS_DROPPED = Counter(
    "receiver_callback_fields_dropped_total",
    "Optional callback fields that could not be read and were stored as null (the raw body keeps them).",
    ["field"])
CALLBACKS_UNSTORED = Counter(
    "receiver_callbacks_unstored_total", "Callbacks answered 503 because the database could not store them.")
REJECTED = Counter(
    "receiver_rejected_total", "Callbacks refused, by reason.", ["reason"])
CALLBACKS_PREVIOUS_TOKEN = Counter(
    "receiver_callbacks_previous_token_total",
    "Callbacks that came with CALLBACK_TOKEN_PREVIOUS: TWIN still uses the callback URL from before a rotation.")
TWIN_CALLS = Counter(
    "receiver_twin_calls_total", "HTTP attempts made to TWIN, by endpoint and outcome.", ["endpoint", "outcome"])


# The callback counter's series by label value: labels() takes a lock and builds a key on every call,
# and the callback path counts once per callback.
_CALLBACK_SERIES: dict[str, object] = {}


def count_callback(status: str | None) -> None:
    """Count a stored callback by its new status (None: an exact repeat). A status outside the known set
    counts as 'other': every label value is a series of its own, and senders can make statuses up."""
    label = "duplicate" if status is None else status if status in RANKS else "other"
    series = _CALLBACK_SERIES.get(label)
    if series is None:
        series = _CALLBACK_SERIES[label] = CALLBACKS.labels(status=label)
    series.inc()
