"""The TWIN (twin24.ai) HTTP client: auth, the mailing send, the two statistics queries.

Rules: login and the statistics GETs are retried (transport errors, 429, 5xx). A send is retried ONLY
where TWIN provably did not take it (the connection never opened, 429, a 401 then a fresh token); a
read timeout, a dropped connection, a 5xx or an unreadable answer raise `SendOutcomeUnknown`, never
retried. Secrets never reach a log line or an exception message: failures are described from the
exception's class and OS error (never requests' text, which holds the URL), and are not chained.
Each kind of call states its rules as a `RetryPolicy` (SEND_POLICY, READ_POLICY, LOGIN_POLICY) that
one loop, `TwinClient._with_retries`, applies. TWIN's API and the retries in full: docs/twin24-api.md.
"""
from __future__ import annotations

import base64
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

log = logging.getLogger(__name__)

MESSAGE_FIELDS = ("id", "providerMessageId", "status")
SESSION_FIELDS = ("id", "name", "clientId", "messengerType", "status", "botStatus", "startedAt",
                  "lastMessageCreatedAt", "dialogResultsFromBotJson")
DETAIL_CAP = 1000          # characters of TWIN's error text kept in an exception
TOKEN_KEYS = ("token", "authToken")   # TWIN answers `token`; `authToken` is accepted in case a deployment does


class TwinError(Exception):
    """A TWIN call that failed for good (after any retries)."""

    def __init__(self, endpoint: str, status: int | None, detail: str, body: Any = None,
                 retry_after: float | None = None) -> None:
        self.endpoint = endpoint
        self.status = status
        self.detail = detail
        self.body = body            # TWIN's JSON error answer when there was one
        self.retry_after = retry_after  # seconds TWIN asked us to wait before the next call, if it said
        super().__init__(f"TWIN {endpoint}: {status if status is not None else 'no answer'}: {detail}")


class TwinAuthError(TwinError):
    """Credentials refused or the static token rejected; not retried. From `send`: nothing was taken."""


class SendRejected(TwinError):
    """TWIN answered a send with a 4xx (not 401/429): it did not take it. `body` has TWIN's JSON error."""


class SendOutcomeUnknown(TwinError):
    """TWIN may have taken the send (timeout after sending, dropped answer, 5xx, unreadable 2xx).
    Never retried: retrying could send the WhatsApp messages twice."""


class SendNotTaken(TwinError):
    """TWIN provably did not take the send, and the retries ran out; safe to send again later."""


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt, as the `on_attempt` hook sees it (`python -m receiver check-twin` prints these).
    `url` has no query string; `response` is None when no answer came (`failure` says why)."""
    endpoint: str
    method: str
    url: str
    status: int | None
    failure: str | None
    seconds: float
    response: requests.Response | None


class _TransportError(Exception):
    """One attempt got no HTTP answer. `before_send`: the connection was never opened."""

    def __init__(self, outcome: str, detail: str, before_send: bool) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.before_send = before_send


def _busy(status: int) -> bool:
    """TWIN's rate limiter (429) or a server error (5xx): TWIN did not answer the request's question."""
    return status == 429 or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """What one kind of TWIN call does with each outcome of an attempt; `TwinClient._with_retries`
    applies it. Retries are counted from 0 up to `twin24_retries`; every pause is `_pause`'s
    (Retry-After when TWIN gives one, else exponential backoff with jitter, capped by
    `twin24_max_retry_wait`)."""
    retried: Callable[[int], bool] = _busy
    """HTTP statuses answered by another attempt. A transport error is retried too, unless
    `may_take` says the request may have been taken."""
    may_take: bool = False
    """The call changes something at TWIN (a send). An attempt that went out and got no answer, or a
    5xx, may have been taken: it raises SendOutcomeUnknown and is never retried, whatever `retried`
    says. Only a connection never opened (and the statuses of `retried`) is tried again."""
    bearer: bool = True
    """The call carries the token; a 401 drops it and the call is repeated with a fresh one."""
    one_reauth: bool = False
    """One fresh token per call (a send); else a 401 after any other answer gets a fresh one again."""
    long_wait_ends: bool = False
    """A Retry-After beyond `twin24_max_retry_wait` ends the call at once (the error says the wait)."""
    no_token: type[TwinError] | None = None
    """Raised (naming the cause) when no token can be had; None: that error is raised as it is.
    TwinAuthError always passes as it is."""
    gave_up: type[TwinError] = TwinError
    """Raised when the retries run out."""
    gave_up_note: str = ""
    """Put before TWIN's error text when the retries ran out on an answer ("rate limited: ")."""
    gave_up_body: bool = True
    """That error keeps TWIN's JSON error answer as `body`."""
    gave_up_retry_after: bool = True
    """That error keeps TWIN's Retry-After as `retry_after`."""


SEND_POLICY = RetryPolicy(retried=lambda status: status == 429, may_take=True, one_reauth=True,
                          no_token=SendNotTaken, gave_up=SendNotTaken, gave_up_note="rate limited: ",
                          gave_up_retry_after=False)
READ_POLICY = RetryPolicy(long_wait_ends=True)
LOGIN_POLICY = RetryPolicy(bearer=False, gave_up_body=False, gave_up_retry_after=False)


# --- secrets out of urllib3's debug log (it logs full URLs, and the refresh URL holds the refresh token)
_REFRESH_IN_URL = re.compile(r"(refreshToken=)[^&\s\"']+")


class _RedactRefreshToken(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        if "refreshToken=" in message:
            record.msg, record.args = _REFRESH_IN_URL.sub(r"\1***", message), None
        return True


_urllib3_log = logging.getLogger("urllib3.connectionpool")
if not any(isinstance(f, _RedactRefreshToken) for f in _urllib3_log.filters):
    _urllib3_log.addFilter(_RedactRefreshToken())


def _jwt_claims(token: str) -> dict:
    """The JWT payload (base64url JSON), unverified; {} if the token is not a readable JWT."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return claims if isinstance(claims, dict) else {}
    except (IndexError, ValueError, TypeError):
        return {}


def _as_number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _iso(moment: datetime, *, ceil: bool = False) -> str:
    """Whole-second ISO 8601 in UTC with offset; `ceil` rounds up so a window only ever widens."""
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("from/to must be timezone-aware datetimes")
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + (timedelta(seconds=1) if ceil else timedelta(0))
    return moment.isoformat()


class TwinClient:
    """A TWIN client shared safely by threads. docs/twin24-api.md, "Retries", has the retry rules.

    A `session` given by the caller is used as is: it must not carry urllib3 retries of its own
    (the default requests adapter has none), or a send could be repeated behind our back."""

    backoff_base = 0.5          # seconds; attempt n waits about base * 2**n (with jitter), capped
    refresh_margin = 60.0       # refresh this long before the token's exp (at most a quarter of its life)

    def __init__(self, settings, session: requests.Session | None = None,
                 on_call: Callable[[str, str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 on_attempt: Callable[[Attempt], None] | None = None,
                 pacer: Callable[[str], float] | None = None) -> None:
        self.settings = settings
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=0)      # every retry decision is ours, none is urllib3's
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self._on_call = on_call
        self._on_attempt = on_attempt
        self._pacer = pacer             # called before every attempt: waits for a slot of the call budget
        self._reserved: set[str] = set()    # endpoints whose next attempt has its slot already (reserve_call)
        self._sleep = sleep
        self._timeout = (settings.twin24_connect_timeout, settings.twin24_read_timeout)
        self._random = random.Random()
        self._count_lock = threading.Lock()
        self.calls = 0
        # token state, guarded by _token_lock (held during login/refresh so one thread does them)
        self._token_lock = threading.RLock()
        self._static = settings.twin24_token or None
        self._token: str | None = None
        self._refresh_token: str | None = None
        self._renew_at = 0.0        # time.monotonic() after which the token is renewed before use
        self._refresh_by_post = True    # False once TWIN refused POST /refresh (404/405) and GET worked
        if not self._static and not (settings.twin24_login and settings.twin24_password):
            raise ValueError("TwinClient needs TWIN24_TOKEN or TWIN24_LOGIN and TWIN24_PASSWORD")

    # ------------------------------------------------------------------ auth, one step at a time
    @property
    def uses_static_token(self) -> bool:
        return bool(self._static)

    @property
    def holds_refresh_token(self) -> bool:
        return self._refresh_token is not None

    def log_in(self) -> None:
        """Log in now, whatever token is held. Raises TwinAuthError or TwinError."""
        with self._token_lock:
            self._token = self._refresh_token = None
            self._store_pair(*self._login())

    def refresh(self) -> None:
        """Refresh the held token now, without falling back to a login. Raises TwinError."""
        with self._token_lock:
            if not (self._token and self._refresh_token):
                raise TwinError("refresh", None, "nothing to refresh: no token and refresh token held")
            try:
                self._store_pair(*self._refresh())
            except _TransportError as failure:
                raise TwinError("refresh", None, failure.detail) from None

    def close(self) -> None:
        self._session.close()

    def redact(self, text: str) -> str:
        """`text` with the password and every token this client knows replaced by ***."""
        for secret in (self._static, self.settings.twin24_password, self._token, self._refresh_token):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    # ------------------------------------------------------------------ public calls
    def reserve_call(self, endpoint: str) -> None:
        """Take the call-budget slot of the next attempt at `endpoint` now. A send takes it before its rows
        are marked in flight: a run stopped while it waits leaves them pending, not of unknown outcome."""
        if self._pacer is not None and endpoint not in self._reserved:
            self._pacer(endpoint)
            self._reserved.add(endpoint)

    def send(self, payload: dict) -> list[dict]:
        """POST {notify}/messages; the answer list, one item per destination in order.

        Raises SendRejected, SendOutcomeUnknown, SendNotTaken or TwinAuthError (nothing taken)."""
        endpoint, url = "send", f"{self.settings.twin24_notify_url}/messages"
        expected = _count_destinations(payload)
        resp = self._with_retries(endpoint, "POST", url, SEND_POLICY, json_body=payload)
        status = resp.status_code
        if not 200 <= status < 300:
            raise SendRejected(endpoint, status, self._error_text(resp), _json_or_none(resp))
        answer = _json_or_none(resp)
        if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
            raise SendOutcomeUnknown(endpoint, status, "TWIN accepted the send but its answer is not "
                                     f"a JSON list of objects: {_snippet(resp)}")
        if expected is not None and len(answer) != expected:
            raise SendOutcomeUnknown(endpoint, status, f"TWIN answered {len(answer)} items for "
                                     f"{expected} destinations; ids cannot be matched", answer)
        return answer

    def iter_messages(self, start: datetime, end: datetime,
                      fields: Iterable[str] = MESSAGE_FIELDS) -> Iterator[list[dict]]:
        """Pages of GET {analyse}/statistics/messaging/messages (chat messages created in [start, end])."""
        params = {"from": _iso(start), "to": _iso(end, ceil=True), "channel": "CHAT",
                  "fields": _fields(fields)}
        return self._pages("messages_stats",
                           f"{self.settings.twin24_analyse_url}/statistics/messaging/messages", params)

    def iter_sessions(self, start: datetime, end: datetime,
                      fields: Iterable[str] = SESSION_FIELDS) -> Iterator[list[dict]]:
        """Pages of GET {analyse}/statistics/chat/sessions (sessions started in [start, end])."""
        params = {"from": _iso(start), "to": _iso(end, ceil=True), "fields": _fields(fields),
                  "withoutCount": "false"}
        return self._pages("sessions_stats",
                           f"{self.settings.twin24_analyse_url}/statistics/chat/sessions", params)

    # ------------------------------------------------------------------ paging
    def _pages(self, endpoint: str, url: str, params: dict) -> Iterator[list[dict]]:
        """Yield pages until one is empty, `count` items were received, a page adds no new id (a
        server ignoring `page`), or, without a count, a page is shorter than every earlier one (the
        server may cap `limit` silently, so a page shorter than `limit` alone proves nothing).
        Items already yielded (same id) are not yielded again; items are otherwise as received."""
        limit = self.settings.twin24_page_size
        seen_ids: set = set()
        received = 0
        shortest: int | None = None
        page = 0
        while True:
            body = self._get_json(endpoint, url, {**params, "page": page, "limit": limit})
            items, count = _page_items(endpoint, body)
            if not items:
                return
            fresh = []
            for item in items:
                key = item.get("id")
                if key is not None and not isinstance(key, (dict, list)):
                    if key in seen_ids:
                        continue
                    seen_ids.add(key)
                fresh.append(item)
            received += len(fresh)          # distinct items: a shifted page's repeats do not count
            if not fresh:
                log.warning("TWIN %s page %d repeated earlier items only; stopping", endpoint, page)
                return
            yield fresh
            if count is not None:
                if received >= count:
                    return
            elif shortest is not None and len(items) < shortest:
                return
            shortest = len(items) if shortest is None else min(shortest, len(items))
            page += 1

    # ------------------------------------------------------------------ retries
    def _get_json(self, endpoint: str, url: str, params: dict):
        resp = self._with_retries(endpoint, "GET", url, READ_POLICY, params=params)
        status = resp.status_code
        if not 200 <= status < 300:
            raise TwinError(endpoint, status, self._error_text(resp), _json_or_none(resp))
        try:
            return resp.json()
        except ValueError:
            raise TwinError(endpoint, status, f"answer is not JSON: {_snippet(resp)}") from None

    def _with_retries(self, endpoint: str, method: str, url: str, policy: RetryPolicy, *,
                      params: dict | None = None, json_body=None) -> requests.Response:
        """Attempt the call until an answer `policy` neither retries nor refuses the token of, and
        return that answer (2xx, or an error for the caller to read). Raises when the retries run
        out, when a send's outcome became unknown, and on a token refused twice (or a static one)."""
        attempt, reauthed = 0, False
        while True:
            token = self._token_for(endpoint, policy) if policy.bearer else None
            try:
                resp = self._attempt(endpoint, method, url, token=token, params=params, json_body=json_body)
            except _TransportError as failure:
                if policy.may_take and not failure.before_send:
                    raise SendOutcomeUnknown(endpoint, None, f"{failure.detail}; the request had gone "
                                             "out, TWIN may have taken it (not retried)") from None
                if attempt >= self.settings.twin24_retries:
                    raise policy.gave_up(endpoint, None, f"{failure.detail} "
                                         f"(gave up after {attempt + 1} attempts)") from None
                self._pause(endpoint, attempt, None, failure.outcome)
                attempt += 1
                continue
            status = resp.status_code
            if status == 401 and policy.bearer:
                self._token_refused(endpoint, token, resp, reauthed)
                reauthed = True
                continue
            reauthed = reauthed and policy.one_reauth   # else a token may expire again: renewable again
            if policy.may_take and status >= 500:
                raise SendOutcomeUnknown(endpoint, status, f"{self._error_text(resp)}; TWIN may have "
                                         "taken it (not retried)", _json_or_none(resp))
            if not policy.retried(status):
                return resp
            self._pause_or_give_up(endpoint, attempt, resp, policy)
            attempt += 1

    def _token_for(self, endpoint: str, policy: RetryPolicy) -> str:
        try:
            return self._current_token()
        except TwinAuthError:
            raise
        except TwinError as exc:
            if policy.no_token is None:
                raise
            raise policy.no_token(endpoint, None, f"no token to send with: {exc.detail}") from None

    def _pause_or_give_up(self, endpoint: str, attempt: int, resp: requests.Response,
                          policy: RetryPolicy) -> None:
        """Wait before retrying an answer `policy` retries, or raise `policy.gave_up` if it may not."""
        status, wait = resp.status_code, _retry_after(resp)
        if policy.long_wait_ends and wait is not None and wait > self.settings.twin24_max_retry_wait:
            raise policy.gave_up(endpoint, status, f"{self._error_text(resp)} (TWIN asks us to wait "
                                 f"{wait:.0f} s)", _json_or_none(resp), retry_after=wait)
        if attempt >= self.settings.twin24_retries:
            raise policy.gave_up(endpoint, status, f"{policy.gave_up_note}{self._error_text(resp)} "
                                 f"(gave up after {attempt + 1} attempts)",
                                 _json_or_none(resp) if policy.gave_up_body else None,
                                 retry_after=wait if policy.gave_up_retry_after else None)
        self._pause(endpoint, attempt, resp, str(status))

    # ------------------------------------------------------------------ one HTTP attempt
    def _attempt(self, endpoint: str, method: str, url: str, *, token: str | None,
                 params: dict | None = None, json_body=None) -> requests.Response:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if endpoint in self._reserved:
            self._reserved.discard(endpoint)
        elif self._pacer is not None:
            self._pacer(endpoint)       # before anything leaves: a wait here cannot make TWIN take a send twice
        with self._count_lock:
            self.calls += 1
        started = time.monotonic()
        try:
            resp = self._session.request(method, url, params=params, json=json_body, headers=headers,
                                         timeout=self._timeout, allow_redirects=False)
        except requests.exceptions.RequestException as exc:
            failure = _classify(exc)
            self._report(endpoint, failure.outcome)
            self._trace(Attempt(endpoint, method, url, None, failure.detail, time.monotonic() - started, None))
            raise failure from None
        self._report(endpoint, str(resp.status_code))
        self._trace(Attempt(endpoint, method, url, resp.status_code, None, time.monotonic() - started, resp))
        return resp

    def _report(self, endpoint: str, outcome: str) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(endpoint, outcome)
        except Exception:  # a metrics hook never breaks a TWIN call
            log.exception("on_call hook failed for %s %s", endpoint, outcome)

    def _trace(self, attempt: Attempt) -> None:
        if self._on_attempt is None:
            return
        try:
            self._on_attempt(attempt)
        except Exception:  # an observer never breaks a TWIN call
            log.exception("on_attempt hook failed for %s", attempt.endpoint)

    def _pause(self, endpoint: str, attempt: int, resp: requests.Response | None, outcome: str) -> None:
        cap = self.settings.twin24_max_retry_wait
        wait = _retry_after(resp) if resp is not None else None
        if wait is None:
            step = min(cap, self.backoff_base * 2 ** attempt)
            wait = step / 2 + self._random.uniform(0, step / 2)
        wait = max(0.0, min(cap, wait))
        log.warning("TWIN %s: %s, retry %d of %d in %.2fs", endpoint, outcome, attempt + 1,
                    self.settings.twin24_retries, wait)
        self._sleep(wait)

    def _error_text(self, resp: requests.Response) -> str:
        """TWIN's `error` (and `details`) or the start of the body, with our secrets blanked."""
        body = _json_or_none(resp)
        if isinstance(body, dict) and ("error" in body or "details" in body):
            text = str(body.get("error") or "")
            if body.get("details") not in (None, "", {}, []):
                text += f" (details: {json.dumps(body['details'], ensure_ascii=False)})"
        else:
            text = _snippet(resp)
        return self.redact(f"HTTP {resp.status_code}: {text}")[:DETAIL_CAP]

    # ------------------------------------------------------------------ tokens
    def _current_token(self) -> str:
        if self._static:
            return self._static
        with self._token_lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._renew()
            return self._token

    def _token_refused(self, endpoint: str, token: str, resp: requests.Response, reauthed: bool) -> None:
        """A call was answered 401: drop that token so the next attempt gets a fresh one, or give up."""
        text = self._error_text(resp)
        if self._static:
            raise TwinAuthError(endpoint, 401, f"the static token (TWIN24_TOKEN) was refused: {text}",
                                _json_or_none(resp))
        if reauthed:
            raise TwinAuthError(endpoint, 401, f"refused even with a fresh token: {text}",
                                _json_or_none(resp))
        log.info("TWIN %s: token refused (%s); renewing it", endpoint, text)
        with self._token_lock:
            if self._token == token:           # another thread may have renewed it already
                self._renew_at = 0.0

    def _renew(self) -> None:
        """Refresh the token if we hold a refresh token, else (or if that fails) log in. Lock held."""
        if self._refresh_token and self._token:
            try:
                self._store_pair(*self._refresh())
                return
            except (TwinError, _TransportError) as exc:
                log.info("TWIN refresh failed (%s); logging in again", getattr(exc, "detail", exc))
        self._token = self._refresh_token = None
        self._store_pair(*self._login())

    def _refresh(self) -> tuple[str, str | None]:
        """POST {auth}/refresh; if TWIN answers that 404/405, GET {auth}/refresh?refreshToken= once
        (and from then on, if it works). One attempt each: a failure falls back to a new login.
        The current token goes along as a Bearer header: TWIN's SDK sends it, TWIN does not need it.
        An answer without a refreshToken keeps the one we hold (whether they rotate is undocumented)."""
        url, ttl = f"{self.settings.twin24_auth_url}/refresh", self.settings.twin24_token_ttl
        if self._refresh_by_post:
            resp = self._attempt("refresh", "POST", url, token=self._token,
                                 json_body={"refreshToken": self._refresh_token, "ttl": ttl})
            if resp.status_code not in (404, 405):
                token, refresh_token = self._token_answer("refresh", resp)
                return token, refresh_token or self._refresh_token
            log.info("TWIN refresh: POST answered %d; trying GET ?refreshToken=", resp.status_code)
        resp = self._attempt("refresh", "GET", url, token=self._token,
                             params={"refreshToken": self._refresh_token, "ttl": ttl})
        token, refresh_token = self._token_answer("refresh", resp)
        self._refresh_by_post = False
        return token, refresh_token or self._refresh_token

    def _token_answer(self, endpoint: str, resp: requests.Response) -> tuple[str, str | None]:
        if not 200 <= resp.status_code < 300:
            raise TwinError(endpoint, resp.status_code, self._error_text(resp), _json_or_none(resp))
        return _token_pair(endpoint, resp)

    def _login(self) -> tuple[str, str | None]:
        """POST {auth}/login, retried like a GET on connection errors, timeouts, 5xx and 429."""
        endpoint, url = "login", f"{self.settings.twin24_auth_url}/login"
        body = {"email": self.settings.twin24_login, "password": self.settings.twin24_password,
                "ttl": self.settings.twin24_token_ttl}
        resp = self._with_retries(endpoint, "POST", url, LOGIN_POLICY, json_body=body)
        status = resp.status_code
        if 400 <= status < 500:
            raise TwinAuthError(endpoint, status, "TWIN refused the login "
                                f"(TWIN24_LOGIN/TWIN24_PASSWORD): {self._error_text(resp)}",
                                _json_or_none(resp))
        if not 200 <= status < 300:
            raise TwinError(endpoint, status, self._error_text(resp))
        return _token_pair(endpoint, resp)

    def _store_pair(self, token: str, refresh_token: str | None) -> None:
        now_wall, now = time.time(), time.monotonic()
        claims = _jwt_claims(token)
        exp, iat = _as_number(claims.get("exp")), _as_number(claims.get("iat"))
        lifetime = None
        if exp is not None and iat is not None and exp > iat:
            lifetime = exp - iat                    # immune to clock skew between us and TWIN
        elif exp is not None and exp > now_wall:
            lifetime = exp - now_wall
        if lifetime is None:                        # unreadable: trust the ttl we asked for
            lifetime = float(self.settings.twin24_token_ttl)
        self._token = token
        self._refresh_token = refresh_token
        self._renew_at = now + lifetime - min(self.refresh_margin, lifetime / 4)


# ---------------------------------------------------------------------- helpers
def _classify(exc: requests.exceptions.RequestException) -> _TransportError:
    """Describe a failed attempt without requests' text (it holds the URL), and tell whether the
    request provably never left: only a failure to open the connection proves that."""
    reason = None
    if exc.args and isinstance(exc.args[0], MaxRetryError):
        reason = exc.args[0].reason
    before_send = isinstance(exc, requests.exceptions.ConnectTimeout) or \
        isinstance(reason, (NewConnectionError, ConnectTimeoutError))
    outcome = "timeout" if isinstance(exc, requests.exceptions.Timeout) else "connection_error"
    cause = _os_error(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        what = "connect timeout"
    elif isinstance(exc, requests.exceptions.Timeout):
        what = "read timeout (no answer in time)"
    elif before_send:
        what = "could not connect"
    else:
        what = f"connection failed ({type(exc).__name__})"
    return _TransportError(outcome, f"{what}: {cause}" if cause else what, before_send)


def _os_error(exc: BaseException) -> str:
    """The innermost OS-level reason (e.g. '[Errno 111] Connection refused'), if any."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None and current.strerror:
            return f"[Errno {current.errno}] {current.strerror}"
        if type(current).__name__ in ("RemoteDisconnected", "IncompleteRead", "NameResolutionError"):
            return type(current).__name__
        stack.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        stack.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return ""


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _json_or_none(resp: requests.Response):
    try:
        return resp.json()
    except ValueError:
        return None


def _snippet(resp: requests.Response, size: int = 200) -> str:
    text = resp.text if resp.content else ""
    return repr(text[:size]) if text else "(empty body)"


def _token_pair(endpoint: str, resp: requests.Response) -> tuple[str, str | None]:
    """(token, refresh token or None) from a login or refresh answer. The error names the keys TWIN
    sent, never a value: any of them may be a token under a name we do not know."""
    body = _json_or_none(resp)
    if not isinstance(body, dict):
        shape = "not JSON" if body is None else f"a JSON {type(body).__name__}"
        raise TwinError(endpoint, resp.status_code, f"answer is {shape}, not an object with `token` "
                        f"({len(resp.content)} bytes)")
    token = next((body[key] for key in TOKEN_KEYS if isinstance(body.get(key), str) and body[key]), None)
    if token is None:
        keys = ", ".join(sorted(str(key)[:40] for key in body)[:20]) or "none"
        raise TwinError(endpoint, resp.status_code, f"answer has no `token` (nor `authToken`); "
                        f"keys received: {keys}")
    refresh = body.get("refreshToken")
    return token, refresh if isinstance(refresh, str) and refresh else None


def _page_items(endpoint: str, body) -> tuple[list[dict], int | None]:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        shape = f"keys {sorted(body)[:10]}" if isinstance(body, dict) else type(body).__name__
        raise TwinError(endpoint, 200, f"answer lacks an `items` list ({shape})")
    items = body["items"]
    if not all(isinstance(item, dict) for item in items):
        raise TwinError(endpoint, 200, "answer's `items` are not all objects")
    count = body.get("count")
    if isinstance(count, str) and count.strip().isdigit():
        count = int(count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        count = None
    return items, count


def _fields(fields: Iterable[str]) -> str:
    names = [name for name in fields if name]
    if "id" not in names:
        names.insert(0, "id")           # paging deduplicates by id, and callers match by it
    return ",".join(dict.fromkeys(names))


def _count_destinations(payload) -> int | None:
    """How many answer items a send should get, or None if the payload's shape is not the usual one."""
    try:
        return sum(len(message["destinations"]) for message in payload["messages"])
    except (TypeError, KeyError):
        return None
