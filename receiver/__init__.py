"""twin24-receiver: records TWIN's status callbacks and links each message to its bot's result.

`create_app()` is the way in: it reads the settings, binds the database, creates the schema, and
registers the HTTP face (callbacks, api, sending_api, pages) and the CLI commands.
"""
from __future__ import annotations

import sys

from flask import Flask, jsonify, request
from peewee import SqliteDatabase
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from . import api, callbacks, cli, models, pages, sending_api
from .settings import Settings, SettingsError

__all__ = ["create_app", "callback_url", "Settings", "SettingsError"]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.json.ensure_ascii = False     # Cyrillic stays readable in JSON answers
    app.json.sort_keys = False

    models.bind(settings)
    models.create_schema()
    app.config["CALLBACK_TOKEN"] = _token(settings, "callback_token", settings.callback_token)
    app.config["API_TOKEN"] = _token(settings, "api_token", settings.api_token)

    if settings.trusted_proxies:
        # Client addresses come from X-Forwarded-* only as far as the proxies we trust wrote them.
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n, x_prefix=n)

    app.before_request(_connect)
    app.teardown_appcontext(_release)
    for module in (callbacks, api, sending_api, pages):
        app.register_blueprint(module.bp)
    for code in (404, 405):
        app.register_error_handler(code, _routing_error)
    cli.register(app)
    return app


def callback_url(settings: Settings, token: str) -> str:
    return f"{settings.public_url}/callbacks/{token}"


def _token(settings: Settings, key: str, configured: str | None) -> str:
    token, generated = models.ensure_token(key, configured)
    if generated:
        # Printed once, to the console of the process that made it; never logged.
        print(f"twin24-receiver: generated {key.upper()} and kept it in the database.", file=sys.stderr)
        if key == "callback_token":
            print(f"twin24-receiver: set callbackUrl in your TWIN sends to {callback_url(settings, token)}",
                  file=sys.stderr)
        else:
            print(f"twin24-receiver: API token (Authorization: Bearer ...): {token}", file=sys.stderr)
    return token


def _routing_error(error: HTTPException):
    """A path no route has, or a method its route does not take: in JSON on the JSON face (the
    callbacks and /api/), as werkzeug's HTML page on the pages."""
    parts = request.path.split("/")
    if error.code == 405 and len(parts) == 3 and parts[1] == "callbacks":
        return callbacks.receive(parts[2])
    if parts[1] not in ("api", "callbacks"):
        return error
    if error.code == 404:
        return jsonify(error="not_found", detail=f"nothing here: {request.path}"), 404
    methods = sorted(error.valid_methods or ())        # a set: sorted, so the answer is always the same
    allowed = [m for m in methods if m not in ("HEAD", "OPTIONS")]
    return (jsonify(error="method_not_allowed", detail=f"use {' or '.join(allowed)}, not {request.method}"), 405,
            {"Allow": ", ".join(methods)})


def _connect():
    models.db.connect(reuse_if_open=True)


def _release(_exc):
    # SQLite connections stay open with their thread (opening one costs more than a request);
    # pooled PostgreSQL connections go back to the pool.
    if not isinstance(models.db.obj, SqliteDatabase) and not models.db.is_closed():
        models.db.close()
