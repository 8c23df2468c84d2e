"""Logs without secrets: one redaction, used by the app, the worker and gunicorn's own logs.

The callback token is part of a URL (/callbacks/<CALLBACK_TOKEN>), and a URL gets into log lines:
gunicorn's access log and "Error handling request <uri>", Flask's "Exception on <path>", TWIN's error
text echoing the callbackUrl we sent. `redact` replaces any /callbacks/<token> path, secret query
values, and the literal values of the secrets it is given (a token TWIN echoes JSON-escaped as
"\\/callbacks\\/..." is caught by its value) with ***.

This module imports only the standard library: deploy/gunicorn.conf.py loads it by its file path in
the gunicorn master, which must not import the application.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "***"
MIN_SECRET_LENGTH = 4
_CALLBACK_PATH = re.compile(r"(/callbacks/)[^/?#\s\"'\\]+", re.IGNORECASE)
_SECRET_QUERY = re.compile(
    r"(?i)(?<![a-z0-9_])((?:api_?)?token|access_token|api_?key|password|secret)=[^&#\s\"']*")


def redact(text, secrets: Iterable[str] = ()):
    """`text` with callback tokens, secret query values and each of `secrets` replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    # Each pattern needs a character most values (an address, a status, a size) lack: the access
    # log redacts several values per request, and a test for it costs a tenth of the search.
    if "/" in text:
        text = _CALLBACK_PATH.sub(lambda m: m.group(1) + REDACTED, text)
    if "=" in text:
        text = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return text


class RedactFilter(logging.Filter):
    """Redacts a record's final message and its traceback text, whatever format and arguments made them."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets: tuple[str, ...] = ()
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first: a secret that contains another is replaced whole. A value of a few characters
        # (a short TWIN password) would blank ordinary words instead.
        wanted = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        self.secrets = tuple(sorted({*self.secrets, *wanted}, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get("_redacted_by") == id(self):
            return True         # the same filter on a logger and on its handler: once is enough
        try:
            message = record.getMessage()
        except Exception:       # a broken format string: let logging report it as usual
            return True
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatted here, as the handler's formatter would, so that the text can be cleaned; the
            # formatter then uses exc_text as it is.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        record._redacted_by = id(self)     # not the filter itself: a pickled record would carry its secrets
        return True


def install(secrets: Iterable[str] = (), loggers: Iterable[str] = ("receiver", ""),
            handlers: Iterable[logging.Handler] = ()) -> RedactFilter:
    """Redact what these loggers log (records made on them) and what their handlers and `handlers`
    write (records from their children too: a logger's own filters never see a child's records).
    Call it again after handlers are added (logging.basicConfig); secrets given by any call are
    redacted from then on."""
    chosen = _shared_filter()
    chosen.add_secrets(secrets)
    targets = [*handlers, *([logging.lastResort] if logging.lastResort else [])]
    for name in loggers:
        logger = logging.getLogger(name)
        targets += [logger, *logger.handlers]
    for target in targets:
        if not any(isinstance(f, RedactFilter) for f in target.filters):
            target.addFilter(chosen)
        else:
            for found in target.filters:
                if isinstance(found, RedactFilter):
                    found.add_secrets(chosen.secrets)
    return chosen


def _shared_filter() -> RedactFilter:
    """One filter for the process, kept on the `receiver` logger itself."""
    logger = logging.getLogger("receiver")
    for found in logger.filters:
        if isinstance(found, RedactFilter):
            return found
    made = RedactFilter()
    logger.addFilter(made)
    return made
