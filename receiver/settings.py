"""One frozen settings object, built from the environment and an optional `.env` file.

The environment wins over `.env`, so a systemd unit or a container can override what a file says.
A missing or malformed value raises `SettingsError` with one line that names the variable; the
entry points (wsgi.py, the CLI) print that line and stop.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from playhouse.db_url import parse as parse_database_url

PRODUCTION_AUTH_URL = "https://iam.twin24.ai/api/v1/auth"
PRODUCTION_NOTIFY_URL = "https://notify.twin24.ai/api/v1"
PRODUCTION_ANALYSE_URL = "https://analyse.twin24.ai/api/v1"

SQLITE_SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")

# Exit statuses of a process stopped by a bad setting, so that supervisors do not restart it into the
# same error: sysexits' EX_CONFIG for the commands, and gunicorn's "worker failed to boot" for a web
# worker (the master then stops instead of booting new workers). The systemd units name both.
EXIT_BAD_SETTING = 78
FORWARD_EVENT_TYPES = ("message.result", "message.status", "message.given_up")
EXIT_BAD_SETTING_GUNICORN = 3


class SettingsError(ValueError):
    """A setting is missing or malformed; str(error) is one line naming it."""


def masked_url(url: str) -> str:
    """The URL with its password (user:PASSWORD@host, or ?password=...) shown as ***, for printing."""
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:                      # not a URL we can take apart: show none of it
        return "***"
    if has_password:
        userinfo, _, host = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{userinfo.partition(':')[0]}:***@{host}", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def _env(name: str, *, kind: str = "str", default=None, minimum=None, choices=None, secret=False):
    """Declare a setting: the dataclass field carries how to read it from the environment."""
    return field(default=default, metadata={
        "env": name, "kind": kind, "minimum": minimum, "choices": choices, "secret": secret,
    })


@dataclass(frozen=True)
class Settings:
    database_url: str = _env("DATABASE_URL", default="sqlite:///data/receiver.db", secret=masked_url)
    sqlite_synchronous: str = _env("SQLITE_SYNCHRONOUS", default="NORMAL",
                                   choices=SQLITE_SYNCHRONOUS_LEVELS)
    sqlite_busy_timeout: float = _env("SQLITE_BUSY_TIMEOUT", kind="float", default=30.0, minimum=0)

    # Secrets. Unset tokens are generated on first start and kept in the database (see models.Fact).
    callback_token: str | None = _env("CALLBACK_TOKEN", secret=True)
    # The callback token before a rotation: callbacks of sends made with it keep being stored until
    # it is removed (docs/security.md, "Rotating CALLBACK_TOKEN").
    callback_token_previous: str | None = _env("CALLBACK_TOKEN_PREVIOUS", secret=True)
    api_token: str | None = _env("API_TOKEN", secret=True)
    # POST /api/sends (paid mailings) needs this token, not API_TOKEN; unset, sending over HTTP is off.
    send_token: str | None = _env("SEND_TOKEN", secret=True)
    public_url: str = _env("PUBLIC_URL", kind="url", default="http://127.0.0.1:8000")

    twin24_token: str | None = _env("TWIN24_TOKEN", secret=True)
    twin24_login: str | None = _env("TWIN24_LOGIN")
    twin24_password: str | None = _env("TWIN24_PASSWORD", secret=True)
    twin24_auth_url: str = _env("TWIN24_AUTH_URL", kind="url", default=PRODUCTION_AUTH_URL)
    twin24_notify_url: str = _env("TWIN24_NOTIFY_URL", kind="url", default=PRODUCTION_NOTIFY_URL)
    twin24_analyse_url: str = _env("TWIN24_ANALYSE_URL", kind="url", default=PRODUCTION_ANALYSE_URL)
    twin24_connect_timeout: float = _env("TWIN24_CONNECT_TIMEOUT", kind="float", default=5.0, minimum=0.1)
    twin24_read_timeout: float = _env("TWIN24_READ_TIMEOUT", kind="float", default=60.0, minimum=0.1)
    twin24_retries: int = _env("TWIN24_RETRIES", kind="int", default=5, minimum=0)
    twin24_max_retry_wait: float = _env("TWIN24_MAX_RETRY_WAIT", kind="float", default=60.0, minimum=0)
    twin24_page_size: int = _env("TWIN24_PAGE_SIZE", kind="int", default=1000, minimum=1)
    twin24_token_ttl: int = _env("TWIN24_TOKEN_TTL", kind="int", default=86400, minimum=60)
    # Every TWIN call of every process on this database (auth, statistics pages, sends, retries) in
    # any 60 s; 0: no ceiling. Sends get a tenth of it that the other calls leave (receiver/callbudget.py).
    twin24_max_calls_per_minute: int = _env("TWIN24_MAX_CALLS_PER_MINUTE", kind="int", default=60, minimum=0)

    # The callback endpoint.
    max_body_bytes: int = _env("MAX_BODY_BYTES", kind="int", default=64 * 1024, minimum=1024)
    rejected_body_cap: int = _env("REJECTED_BODY_CAP", kind="int", default=16 * 1024, minimum=0)
    trusted_proxies: int = _env("TRUSTED_PROXIES", kind="int", default=0, minimum=0)

    # /metrics: open unless METRICS_TOKEN is set (then `Authorization: Bearer <METRICS_TOKEN>`). Its gauges
    # read from the database are read again at most every METRICS_CACHE_SECONDS, per process.
    metrics_token: str | None = _env("METRICS_TOKEN", secret=True)
    metrics_cache_seconds: float = _env("METRICS_CACHE_SECONDS", kind="float", default=15.0, minimum=0)

    # Enrichment timings, in seconds (see receiver/enrich.py for how they combine).
    enrich_first_check: float = _env("ENRICH_FIRST_CHECK", kind="float", default=2.0, minimum=0)
    enrich_backoff_start: float = _env("ENRICH_BACKOFF_START", kind="float", default=5.0, minimum=0.01)
    enrich_backoff_max: float = _env("ENRICH_BACKOFF_MAX", kind="float", default=900.0, minimum=0.01)
    enrich_stale_after: float = _env("ENRICH_STALE_AFTER", kind="float", default=900.0, minimum=0)
    enrich_sweep_interval: float = _env("ENRICH_SWEEP_INTERVAL", kind="float", default=4.0, minimum=0)
    enrich_result_interval: float = _env("ENRICH_RESULT_INTERVAL", kind="float", default=4.0, minimum=0)
    # A message not finished is looked at again after this share of the time it has spent in its stage.
    enrich_recheck_share: float = _env("ENRICH_RECHECK_SHARE", kind="float", default=0.25, minimum=0.01)
    enrich_batch_share: float = _env("ENRICH_BATCH_SHARE", kind="float", default=0.2, minimum=0)
    enrich_max_wait: float = _env("ENRICH_MAX_WAIT", kind="float", default=30.0, minimum=0)
    enrich_chat_id_horizon: float = _env("ENRICH_CHAT_ID_HORIZON", kind="float", default=6 * 3600, minimum=1)
    enrich_result_horizon: float = _env("ENRICH_RESULT_HORIZON", kind="float", default=72 * 3600, minimum=1)
    enrich_window_margin: float = _env("ENRICH_WINDOW_MARGIN", kind="float", default=600.0, minimum=0)
    enrich_batch_size: int = _env("ENRICH_BATCH_SIZE", kind="int", default=20000, minimum=1)
    enrich_lease: float = _env("ENRICH_LEASE", kind="float", default=900.0, minimum=1)
    enrich_poll_interval: float = _env("ENRICH_POLL_INTERVAL", kind="float", default=1.0, minimum=0.01)

    # Sending.
    send_batch_size: int = _env("SEND_BATCH_SIZE", kind="int", default=500, minimum=1)

    # Forwarding results to the operator's URL (receiver/forwarding.py), signed the Standard Webhooks way.
    # FORWARD_SECRET is "whsec_<base64>"; FORWARD_SECRET_PREVIOUS, while set, signs each event a second
    # time (rotation). Times in seconds.
    forward_url: str | None = _env("FORWARD_URL", kind="url")
    forward_secret: str | None = _env("FORWARD_SECRET", secret=True)
    forward_secret_previous: str | None = _env("FORWARD_SECRET_PREVIOUS", secret=True)
    forward_events: str = _env("FORWARD_EVENTS", default="message.result,message.given_up")
    forward_timeout: float = _env("FORWARD_TIMEOUT", kind="float", default=10.0, minimum=0.1)
    forward_max_age: float = _env("FORWARD_MAX_AGE", kind="float", default=86400.0, minimum=1)
    forward_pause_after: float = _env("FORWARD_PAUSE_AFTER", kind="float", default=3600.0, minimum=0)
    forward_pause_probe: float = _env("FORWARD_PAUSE_PROBE", kind="float", default=300.0, minimum=0)
    forward_batch: int = _env("FORWARD_BATCH", kind="int", default=100, minimum=1)
    forward_backoff_start: float = _env("FORWARD_BACKOFF_START", kind="float", default=5.0, minimum=0.01)
    forward_backoff_max: float = _env("FORWARD_BACKOFF_MAX", kind="float", default=3600.0, minimum=0.01)
    forward_poll_interval: float = _env("FORWARD_POLL_INTERVAL", kind="float", default=0.5, minimum=0.01)

    # Housekeeping: the worker (and `flask prune`) deletes events older than this many days; 0 keeps
    # them all. Messages and their results are never pruned.
    event_retention_days: int = _env("EVENT_RETENTION_DAYS", kind="int", default=90, minimum=0)

    @classmethod
    def from_env(cls, environ: dict | None = None, env_file: str | os.PathLike | None = ".env",
                 **overrides) -> Settings:
        """Read every setting; `overrides` (field names) win over both sources, for tests."""
        source: dict[str, str] = {}
        if env_file and Path(env_file).is_file():
            # Verbatim: a password may hold `$`, `${...}` or backquotes (python-dotenv expands ${VAR} by default).
            source.update({k: v for k, v in dotenv_values(env_file, interpolate=False).items() if v is not None})
        source.update(os.environ if environ is None else environ)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                values[f.name] = overrides.pop(f.name)
                continue
            raw = source.get(f.metadata["env"])
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(f, raw.strip())
        if overrides:
            raise TypeError(f"unknown settings: {', '.join(sorted(overrides))}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        self._check_database_url()
        if self.twin24_login and not self.twin24_password:
            raise SettingsError("TWIN24_PASSWORD: required when TWIN24_LOGIN is set")
        for name in ("callback_token", "callback_token_previous", "api_token", "send_token", "metrics_token"):
            value = getattr(self, name)
            if value is not None and len(value) < 16:
                raise SettingsError(f"{name.upper()}: must be at least 16 characters")
        self._check_forwarding()
        if self.send_token is not None and self.send_token == self.api_token:
            raise SettingsError("SEND_TOKEN: must differ from API_TOKEN (whoever reads results must not send)")

    def _check_forwarding(self) -> None:
        if self.forward_url and not self.forward_secret:
            raise SettingsError("FORWARD_SECRET: required when FORWARD_URL is set (whsec_ and base64 of 24+ random bytes)")
        for name in ("forward_secret", "forward_secret_previous"):
            value = getattr(self, name)
            if value is not None and not _webhook_secret_ok(value):
                raise SettingsError(f"{name.upper()}: expected whsec_ and the base64 of at least 24 random bytes")
        unknown = {e.strip() for e in self.forward_events.split(",") if e.strip()} - set(FORWARD_EVENT_TYPES)
        if unknown:
            raise SettingsError(f"FORWARD_EVENTS: unknown event {sorted(unknown)[0]!r} "
                                f"(known: {', '.join(FORWARD_EVENT_TYPES)})")

    def _check_database_url(self) -> None:
        """Refuse here, in one line, what db.make_database could not open."""
        url = self.database_url
        scheme = url.partition(":")[0]
        if scheme not in ("sqlite", "postgres", "postgresql"):
            # Only the scheme is shown: the rest may hold a password.
            raise SettingsError(f"DATABASE_URL: must be sqlite:///path or postgresql://... (got scheme {scheme!r})")
        if self.is_sqlite:
            if not self.sqlite_path:
                raise SettingsError(f"DATABASE_URL: sqlite needs a file path, e.g. sqlite:///data/receiver.db "
                                    f"(got {masked_url(url)!r})")
            return
        try:
            database = parse_database_url(url).get("database")
        except ValueError as error:         # a port that is not a number, a broken [IPv6] host
            raise SettingsError(f"DATABASE_URL: {error} (got {masked_url(url)!r})") from None
        if not database:
            raise SettingsError("DATABASE_URL: names no database, e.g. postgresql://user:pass@host/receiver "
                                f"(got {masked_url(url)!r})")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")

    @property
    def sqlite_path(self) -> str | None:
        """The file of a sqlite:///path URL; None for anything else (sqlite://x.db, :memory:)."""
        path = self.database_url.removeprefix("sqlite:///") if self.database_url.startswith("sqlite:///") else ""
        return path if path and path != ":memory:" else None

    @property
    def has_twin24_credentials(self) -> bool:
        return bool(self.twin24_token or (self.twin24_login and self.twin24_password))

    def callback_url(self, token: str) -> str:
        """The URL TWIN posts status callbacks to, with the callback token `token` in it (a secret)."""
        return f"{self.public_url}/callbacks/{token}"

    def __repr__(self) -> str:  # secrets never reach a log through a repr
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            mask = f.metadata["secret"]     # True: hide it all; a function: hide the secret part
            if mask and value:
                value = mask(value) if callable(mask) else "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def _webhook_secret_ok(value: str) -> bool:
    try:
        return len(base64.b64decode(value.removeprefix("whsec_") + "==")) >= 24
    except (ValueError, binascii.Error):
        return False


def _parse(f: dataclasses.Field, raw: str):
    name, kind = f.metadata["env"], f.metadata["kind"]
    if kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected a whole number, got {raw!r}") from None
    elif kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    elif kind == "url":
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"{name}: expected an http(s) URL, got {raw!r}")
        value = raw.rstrip("/")
    else:
        value = raw
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {raw!r}")
    choices = f.metadata["choices"]
    if choices is not None:
        value = value.upper()
        if value not in choices:
            raise SettingsError(f"{name}: must be one of {', '.join(choices)}, got {raw!r}")
    return value
