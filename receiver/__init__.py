"""twin24-receiver: records TWIN's status callbacks and links each message to its bot's result.

`create_app()` is the way in: it reads the settings, binds the database, creates the schema, and
registers the HTTP face (callbacks, api, sending_api, pages) and the CLI commands.
"""
from __future__ import annotations

from flask import Flask, request
from flask.logging import default_handler
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from . import api, callbacks, cli, errors, forwards_api, models, pages, redaction, sending_api
from .auth import secrets_of, startup_token
from .db import bind, connect_for_request, release_after_request
from .errors import ApiError
from .settings import Settings, SettingsError

__all__ = ["create_app", "Settings", "SettingsError"]

# The pages use no JavaScript, no inline style and nothing from elsewhere; the charts are inline SVG.
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.json.ensure_ascii = False     # Cyrillic stays readable in JSON answers
    app.json.sort_keys = False

    bind(settings)
    models.create_schema()
    app.config["CALLBACK_TOKEN"] = startup_token(settings, "callback_token", settings.callback_token)
    app.config["CALLBACK_TOKEN_PREVIOUS"] = settings.callback_token_previous
    app.config["API_TOKEN"] = startup_token(settings, "api_token", settings.api_token)
    app.config["SEND_TOKEN"] = settings.send_token
    redaction.install(secrets_of(app), handlers=[default_handler])

    # The usual callback skips Flask's request handling (callbacks.DirectPath), with the same hooks.
    app.wsgi_app = callbacks.DirectPath(app, app.wsgi_app, before=connect_for_request, after=_security_headers)
    if settings.trusted_proxies:
        # Client addresses come from X-Forwarded-* only as far as the proxies we trust wrote them.
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n, x_prefix=n)

    app.before_request(connect_for_request)
    app.after_request(_security_headers)
    app.teardown_appcontext(release_after_request)
    for module in (callbacks, api, sending_api, forwards_api, pages):
        app.register_blueprint(module.bp)
    errors.register(app)
    for code in (404, 405):
        app.register_error_handler(code, _routing_error)
    cli.register(app)
    return app


def _security_headers(response):
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    return response


def _routing_error(error: HTTPException):
    """A path no route has, or a method its route does not take: in JSON on the JSON face (the
    callbacks and /api/), as werkzeug's HTML page on the pages."""
    parts = request.path.split("/")
    if error.code == 405 and len(parts) == 3 and parts[1] == "callbacks":
        return callbacks.receive(parts[2])
    if parts[1] not in ("api", "callbacks"):
        return error
    if error.code == 404:
        return errors.answer(ApiError(404, "not_found", f"nothing here: {request.path}"))
    methods = sorted(error.valid_methods or ())        # a set: sorted, so the answer is always the same
    allowed = [m for m in methods if m not in ("HEAD", "OPTIONS")]
    return errors.answer(ApiError(405, "method_not_allowed", f"use {' or '.join(allowed)}, not {request.method}",
                                  headers={"Allow": ", ".join(methods)}))
