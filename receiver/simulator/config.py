"""SimConfig: every knob of the simulated TWIN, with defaults for a clean, fast, quirk-free TWIN."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Fields holding a (low, high) range of seconds: JSON gives lists, we keep tuples.
RANGE_FIELDS = ("pending_after", "final_after", "result_after")
# How a session with no result yet shows dialogResultsFromBotJson ("missing": the key is left out).
EMPTY_RESULTS = ("{}", "[]", "null", "missing")


@dataclass
class SimConfig:
    seed: int = 0
    # --- auth ---
    login: str = "demo@example.com"
    password: str = "demo"
    static_token: str | None = "sim-static-token"   # never expires; None/"" disables it
    token_ttl: float = 7 * 24 * 3600.0  # upper bound (a week, TWIN's default life); login may ask less
    refresh_ttl: float = 30 * 24 * 3600.0
    # --- message lifecycle (seconds) ---
    pending_after: tuple = (0.05, 0.2)   # CREATED -> PENDING
    final_after: tuple = (0.1, 0.5)      # PENDING -> DELIVERED / UNDELIVERED / ERROR / EXPIRED
    undelivered_rate: float = 0.0
    error_rate_status: float = 0.0
    expired_rate: float = 0.0            # validity period ran out: PENDING -> EXPIRED, no session
    price: float = 1.2                   # price reported on the final callback
    # --- chat sessions ---
    stats_lag: float = 0.0               # delivery -> visible in statistics
    result_after: tuple = (0.2, 1.0)     # session start -> bot result
    no_reply_rate: float = 0.0           # sessions that never get a result
    session_close_after: float = 5.0     # an unanswered session closes this long after start
    close_on_answer: bool = True         # False: an answered session stays open until session_close_after
    empty_result: str = "{}"             # one of EMPTY_RESULTS
    empty_result_null: bool = False      # older spelling of empty_result="null"
    result_confirmations: tuple = ("Да", "Нет", "Отказ")
    # --- callback quirks ---
    duplicate_callbacks: float = 0.0
    reorder_callbacks: float = 0.0
    callback_retries: int = 5
    callback_retry_delay: float = 0.2    # doubles on each retry
    callback_timeout: float = 5.0
    callback_workers: int = 8
    # --- statistics quirks ---
    padding_sessions: int = 0
    shuffle: bool = False
    page_cap: int = 1000
    # --- HTTP quirks (notify + analyse; iam only for rate_limit/slow) ---
    rate_limit: float = 0                # requests/second per endpoint; 0 = off
    retry_after: int = 0                 # Retry-After told with a 429; 0 = when the rate window frees
    error_rate: float = 0.0              # random 500/502/503
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    # --- send failure hooks (0-based index of authenticated send requests) ---
    fail_sends: list = field(default_factory=list)
    drop_after_accept_sends: list = field(default_factory=list)
    drop_sleep: float = 10.0             # <= 0: abort the connection instead of sleeping
    # --- refused destinations: answered with id null and an error object, no message, no callback ---
    refuse_phones: list = field(default_factory=list)   # phones (or messengerUserIds) always refused
    refuse_rate: float = 0.0             # share of the other destinations refused at random

    def __post_init__(self) -> None:
        for name in RANGE_FIELDS:
            value = tuple(getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
            setattr(self, name, value)
        self.result_confirmations = tuple(self.result_confirmations)
        if self.empty_result_null:
            self.empty_result, self.empty_result_null = "null", False
        if self.empty_result not in EMPTY_RESULTS:
            raise ValueError(f"empty_result must be one of {', '.join(EMPTY_RESULTS)}, got {self.empty_result!r}")
        self.fail_sends = list(self.fail_sends)
        self.drop_after_accept_sends = list(self.drop_after_accept_sends)
        self.refuse_phones = [str(p) for p in self.refuse_phones]

    def replace(self, changes: dict[str, Any]) -> SimConfig:
        """A copy with `changes` applied; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_value(text: str) -> Any:
    """A `--set key=value` value: JSON if it parses (numbers, lists, true/null), else the raw string."""
    import json
    try:
        return json.loads(text)
    except ValueError:
        return text
