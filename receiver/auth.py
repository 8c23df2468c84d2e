"""Who may do what: the tokens (API_TOKEN to read, SEND_TOKEN to send, the callback token in TWIN's
callback URL), how a request presents them, and the results page's sessions.

Every secret is compared in constant time and never logged (redaction.py masks the ones secrets_of names).

The page session: a person signs in once with the API token and gets an HttpOnly cookie (SameSite=Lax;
Secure, and named __Host-..., when the site is HTTPS: PUBLIC_URL says https or the request came over it)
valid for SESSION_HOURS; scripts may send HTTP Basic instead (any user name, the token as the password).
The cookie holds a random session id, signed with a key derived from the API token (so changing
API_TOKEN signs everyone out); the server keeps the id's hash (models.PageSession), and signing out
deletes it, so a copied cookie stops working too.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
import sys

from flask import Flask, current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from .db import db, utcnow, write_transaction
from .errors import ApiError
from .models import Fact, PageSession
from .settings import Settings

SECRET_QUERY_NAMES = ("token", "api_token", "access_token", "apikey", "api_key")
COOKIE = "receiver_session"
SECURE_COOKIE = "__Host-receiver_session"      # browsers keep it only if Secure, on Path=/, with no Domain
SESSION_HOURS = 12


# ---- tokens -------------------------------------------------------------------------------------

def same_secret(presented: str | None, expected: str | None) -> bool:
    """Whether `presented` is `expected`, compared in constant time; never when either is unset."""
    return bool(presented and expected) and hmac.compare_digest(presented.encode(), expected.encode())


def token_ok(presented: str | None, name: str = "API_TOKEN") -> bool:
    """Whether `presented` is the token app.config[name] (API_TOKEN, SEND_TOKEN); never when it is unset."""
    return same_secret(presented, current_app.config.get(name))


def api_token_ok(presented: str | None) -> bool:
    return token_ok(presented, "API_TOKEN")


def bearer_token() -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def require_token(*names: str):
    """Let a request through only with `Authorization: Bearer <token>`, one of the tokens `names`."""
    def decorate(view):
        @functools.wraps(view)
        def guarded(*args, **kwargs):
            if any(name in request.args for name in SECRET_QUERY_NAMES):
                # A token in a URL ends up in logs and browser history: refuse it even when right.
                raise ApiError(400, "token_in_query",
                               "send the token in the Authorization header, never in the URL")
            presented = bearer_token()
            if not any(token_ok(presented, name) for name in names):
                wanted = " or ".join(f"<{name}>" for name in names)
                raise ApiError(401, "unauthorized", f"send Authorization: Bearer {wanted}",
                               headers={"WWW-Authenticate": 'Bearer realm="twin24-receiver"'})
            return view(*args, **kwargs)
        return guarded
    return decorate


require_api_token = require_token("API_TOKEN")


def require_send_token(view):
    """Sending (paid mailings) takes SEND_TOKEN, never the reading API_TOKEN; without a SEND_TOKEN
    set, sending over HTTP is off (403)."""
    checked = require_token("SEND_TOKEN")(view)

    @functools.wraps(view)
    def guarded(*args, **kwargs):
        if not current_app.config.get("SEND_TOKEN"):
            raise ApiError(403, "sending_off", "sending over HTTP is off: set SEND_TOKEN")
        return checked(*args, **kwargs)
    return guarded


def ensure_token(key: str, configured: str | None) -> tuple[str, bool]:
    """The token from the settings, or one generated once and kept in the database.

    Returns (token, generated_now); generated_now is True in exactly one process, the one that
    should tell the operator.
    """
    if configured:
        return configured, False
    candidate = secrets.token_urlsafe(32)
    with db.connection_context():
        inserted = Fact.insert(key=key, value=candidate).on_conflict_ignore().execute()
        stored = Fact.get_by_id(key).value
    return stored, bool(inserted) and stored == candidate


def startup_token(settings: Settings, key: str, configured: str | None) -> str:
    """The token `key` for the app being made: configured, or generated (and then announced) once."""
    token, generated = ensure_token(key, configured)
    if generated:
        _announce(settings, key, token)
    return token


def _announce(settings: Settings, key: str, token: str) -> None:
    """Say once, in the process that generated it, that a token was made. The token itself only goes
    to a terminal: a service's stderr is a log (journald, docker logs) that others may read."""
    name = key.upper()
    if not _stderr_is_a_terminal():
        print(f"twin24-receiver: generated {name} and kept it in the database; "
              "see it with `python -m receiver show-token` in a terminal", file=sys.stderr)
        return
    print(f"twin24-receiver: generated {name} and kept it in the database.", file=sys.stderr)
    if key == "callback_token":
        print(f"twin24-receiver: set callbackUrl in your TWIN sends to {settings.callback_url(token)}",
              file=sys.stderr)
    else:
        print(f"twin24-receiver: API token (Authorization: Bearer ...): {token}", file=sys.stderr)


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):        # replaced by something without isatty, or closed
        return False


def current_callback_url(settings: Settings) -> str:
    """The callback URL as of now, for a send going out now: CALLBACK_TOKEN, else the token generated
    and kept in the database (create_app made it). Read at send time, so that sends queued before a
    rotation go out with the new token."""
    return settings.callback_url(settings.callback_token or Fact.get_by_id("callback_token").value)


def secrets_of(app: Flask) -> list[str]:
    """Every secret value the app knows, for the log redaction."""
    settings = app.config["SETTINGS"]
    return [value for value in (app.config["CALLBACK_TOKEN"], settings.callback_token_previous,
                                app.config["API_TOKEN"], settings.send_token, settings.twin24_token,
                                settings.twin24_password) if value]


# ---- the results page's sessions ------------------------------------------------------------------

def _signer() -> URLSafeTimedSerializer:
    key = hmac.new(current_app.config["API_TOKEN"].encode(), b"twin24-receiver results page session",
                   hashlib.sha256).hexdigest()
    return URLSafeTimedSerializer(key, salt="results-page")


def cookie_secure() -> bool:
    """HTTPS, as PUBLIC_URL says (a proxy may talk plain HTTP to us) or as the request came."""
    return request.is_secure or current_app.config["SETTINGS"].public_url.startswith("https://")


def cookie_name() -> str:
    return SECURE_COOKIE if cookie_secure() else COOKIE


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _session_id(max_age: int | None = SESSION_HOURS * 3600) -> str | None:
    """The session id of the request's cookie, if its signature (made with the current API token) holds."""
    cookie = request.cookies.get(cookie_name())
    if not cookie:
        return None
    try:
        session_id = _signer().loads(cookie, max_age=max_age)
    except BadSignature:
        return None
    return session_id if isinstance(session_id, str) else None


def start_session() -> str:
    """A new session: its row, and the signed cookie value. Expired rows go at the same time."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    with write_transaction():
        PageSession.delete().where(PageSession.expires_at < now).execute()
        PageSession.create(id_hash=_session_hash(session_id), created_at=now,
                           expires_at=now + dt.timedelta(hours=SESSION_HOURS))
    return _signer().dumps(session_id)


def _session_alive(session_id: str) -> bool:
    return PageSession.select().where((PageSession.id_hash == _session_hash(session_id))
                                      & (PageSession.expires_at > utcnow())).exists()


def end_session() -> None:
    """The request's session ends on the server (a copy of its cookie stops working too)."""
    session_id = _session_id(max_age=None)
    if session_id is not None:
        with write_transaction():
            PageSession.delete().where(PageSession.id_hash == _session_hash(session_id)).execute()


def signed_in() -> bool:
    """A live session cookie, or HTTP Basic with the API token as the password."""
    session_id = _session_id()
    if session_id is not None and _session_alive(session_id):
        return True
    auth = request.authorization
    return bool(auth and auth.type == "basic" and api_token_ok(auth.password))
