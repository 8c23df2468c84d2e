"""`python -m receiver check-twin`: the TWIN settings tried once, step by step, ending with a verdict.

It drives the worker's own TwinClient (login or TWIN24_TOKEN, refresh, both statistics for the last hour,
one item each) and prints every HTTP call it made: method and URL, TWIN's status, the time, and the
shape of the answer (keys and JSON types, never a value). It sends no message.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from .callbudget import CallBudget
from .settings import masked_url
from .twin24 import Attempt, TwinClient, TwinError

EXIT_OK, EXIT_FAILED, EXIT_NO_CREDENTIALS = 0, 1, 2
STEP_NAMES = {"login": "login", "refresh": "refresh", "messages_stats": "message statistics",
              "sessions_stats": "session statistics"}
URL_SETTINGS = {"login": "TWIN24_AUTH_URL", "refresh": "TWIN24_AUTH_URL",
                "messages_stats": "TWIN24_ANALYSE_URL", "sessions_stats": "TWIN24_ANALYSE_URL"}
CREDENTIALS = "TWIN24_LOGIN/TWIN24_PASSWORD"
NESTING = 3            # levels of nested objects described before "{...}"
KEYS_SHOWN = 30        # keys of one object described before "..."


def run(settings, echo: Callable[[str], None]) -> int:
    """Check TWIN with these settings, printing through `echo`; the exit status."""
    if not settings.has_twin24_credentials:
        echo("verdict: no TWIN credentials: set TWIN24_LOGIN and TWIN24_PASSWORD (or TWIN24_TOKEN) "
             "in .env or the environment, then run this again")
        return EXIT_NO_CREDENTIALS
    return TwinCheck(settings, echo).run()


class TwinCheck:
    def __init__(self, settings, echo: Callable[[str], None]) -> None:
        # One call per step: no retries (a failure is reported, not waited out), the smallest page.
        self.settings = dataclasses.replace(settings, twin24_retries=0, twin24_page_size=1)
        self.echo = echo
        self.client = TwinClient(self.settings, on_attempt=self.show_attempt, pacer=CallBudget.pacer(self.settings))
        self.problems: list[str] = []

    def run(self) -> int:
        try:
            if self.token_step():
                self.refresh_step()
                end = datetime.now(UTC)
                self.statistics_step(self.client.iter_messages, end - timedelta(hours=1), end)
                self.statistics_step(self.client.iter_sessions, end - timedelta(hours=1), end)
        finally:
            self.client.close()
        if self.problems:
            self.say("verdict: " + "; ".join(self.problems))
            return EXIT_FAILED
        self.say("verdict: ok")
        return EXIT_OK

    # -- the steps -----------------------------------------------------------------------------
    def token_step(self) -> bool:
        if self.client.uses_static_token:
            ignored = " (TWIN24_LOGIN is not used while TWIN24_TOKEN is set)" if self.settings.twin24_login else ""
            self.say(f"login: skipped: the static token TWIN24_TOKEN is used{ignored}")
            return True
        return self.attempt(self.client.log_in)

    def refresh_step(self) -> None:
        if self.client.uses_static_token:
            self.say("refresh: skipped: a static token (TWIN24_TOKEN) is never refreshed")
        elif not self.client.holds_refresh_token:
            self.say("refresh: skipped: TWIN's login answer has no refreshToken (the worker logs in "
                     "again when its token runs out)")
        else:
            self.attempt(self.client.refresh)

    def statistics_step(self, pages, start: datetime, end: datetime) -> None:
        def first_page():
            walk = pages(start, end)
            next(walk, None)
            walk.close()
        self.attempt(first_page)

    def attempt(self, step: Callable[[], None]) -> bool:
        try:
            step()
        except TwinError as error:
            self.problems.append(self.diagnose(error))
            return False
        return True

    # -- what is printed -----------------------------------------------------------------------
    def say(self, line: str) -> None:
        self.echo(self.client.redact(line))

    def show_attempt(self, attempt: Attempt) -> None:
        name = STEP_NAMES.get(attempt.endpoint, attempt.endpoint)
        took = f"{attempt.seconds * 1000:.0f} ms"
        if attempt.response is None:
            self.say(f"{name}: {attempt.method} {plain_url(attempt.url)} -> no answer after {took}: "
                     f"{attempt.failure}")
            return
        self.say(f"{name}: {attempt.method} {plain_url(attempt.url)} -> {attempt.status} in {took}: "
                 f"{answer_shape(attempt.response)}")

    def diagnose(self, error: TwinError) -> str:
        """What went wrong, in one sentence that names the setting to look at."""
        step, status = STEP_NAMES.get(error.endpoint, error.endpoint), error.status
        setting = URL_SETTINGS.get(error.endpoint, "TWIN24_AUTH_URL")
        where = f"{setting} ({masked_url(getattr(self.settings, setting.lower()))})"
        said = twin_said(error)
        if status is None:
            return f"{step}: TWIN could not be reached ({said}): check {where} and the network"
        if status in (404, 405):
            return f"{step}: TWIN has no such endpoint ({said}): check {where}"
        if error.endpoint == "login" and status in (400, 401, 403, 422):
            return f"{step}: TWIN refused the login ({said}): check {CREDENTIALS}"
        if status == 401 and self.client.uses_static_token:
            return f"{step}: TWIN refused the token ({said}): check TWIN24_TOKEN"
        if status == 401 and error.endpoint == "refresh":
            return (f"{step}: TWIN refused the refresh ({said}); the worker logs in again instead, "
                    f"but check {where}")
        if status == 401:
            return (f"{step}: TWIN refused a fresh token ({said}): check that TWIN24_AUTH_URL and "
                    f"{setting} belong to the same TWIN (both production, or both dev)")
        if status == 403:
            account = "TWIN24_TOKEN" if self.client.uses_static_token else CREDENTIALS
            return f"{step}: TWIN forbids it ({said}): check the account's rights ({account})"
        if status == 429 or status >= 500:
            return f"{step}: TWIN is busy or failing ({said}): try again later"
        if 200 <= status < 300:
            return f"{step}: TWIN's answer is not what the receiver reads ({said}): check {where}"
        return f"{step}: TWIN refused the call ({said}): check {where}"


def twin_said(error: TwinError) -> str:
    """TWIN's own `error` text with the status when it gave one, else the client's account of it."""
    body = error.body
    if error.status is not None and isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"HTTP {error.status}: {body['error'][:200]}"
    return error.detail


# ---------------------------------------------------------------------- shapes, never values
def plain_url(url: str) -> str:
    """The URL without user info, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def answer_shape(response) -> str:
    """The answer's keys and JSON types, e.g. `token: str, refreshToken: str`."""
    if not response.content:
        return "empty body"
    try:
        body = response.json()
    except ValueError:
        kind = response.headers.get("Content-Type", "no Content-Type")
        return f"not JSON ({kind}, {len(response.content)} bytes)"
    if isinstance(body, dict) and body:
        return _fields(body, 0)
    return shape(body)


def shape(value, depth: int = 0) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float, str)):
        return type(value).__name__
    if isinstance(value, list):
        return f"list[{len(value)}] of {_union(value, depth)}" if value else "list[0]"
    if isinstance(value, dict):
        if depth >= NESTING:
            return "{...}" if value else "{}"
        return "{" + _fields(value, depth + 1) + "}"
    return type(value).__name__


def _fields(obj: dict, depth: int) -> str:
    shown = [f"{key}: {shape(value, depth)}" for key, value in list(obj.items())[:KEYS_SHOWN]]
    if len(obj) > KEYS_SHOWN:
        shown.append(f"... ({len(obj) - KEYS_SHOWN} more keys)")
    return ", ".join(shown)


def _union(items: list, depth: int) -> str:
    """One description for a list's items: objects merged key by key (`str|null` where they differ)."""
    if all(isinstance(item, dict) for item in items) and depth < NESTING:
        merged: dict[str, list[str]] = {}
        for item in items:
            for key, value in item.items():
                kinds = merged.setdefault(str(key), [])
                kind = shape(value, depth + 1)
                if kind not in kinds:
                    kinds.append(kind)
        shown = [f"{key}: {'|'.join(kinds)}" for key, kinds in list(merged.items())[:KEYS_SHOWN]]
        if len(merged) > KEYS_SHOWN:
            shown.append(f"... ({len(merged) - KEYS_SHOWN} more keys)")
        return "{" + ", ".join(shown) + "}"
    kinds: list[str] = []
    for item in items:
        kind = shape(item, depth + 1)
        if kind not in kinds:
            kinds.append(kind)
    return "|".join(kinds)
