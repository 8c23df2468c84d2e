"""The Flask app: TWIN's iam, notify and analyse services under path prefixes, plus /_sim control."""
from __future__ import annotations

import functools
import math
import random
import socket
import threading
import time
from collections import defaultdict, deque

from flask import Blueprint, Flask, current_app, jsonify, request

from . import stats
from .config import SimConfig
from .tokens import TokenStore
from .validation import Invalid, validate_send
from .world import World


class Quirks:
    """The HTTP-level misbehaviour: rate limit, random 5xx, slow answers (seeded)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = random.Random(f"{world.config.seed}:http")
        self.lock = threading.Lock()
        self.recent: dict[str, deque] = defaultdict(deque)

    def roll(self) -> float:
        with self.lock:
            return self.rng.random()

    def retry_after(self, endpoint: str) -> int | None:
        """Seconds to wait if `endpoint` is over the rate limit now, else None (and the call counts)."""
        limit = self.world.config.rate_limit
        if not limit:
            return None
        now = time.monotonic()
        with self.lock:
            window = self.recent[endpoint]
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= limit:
                return self.world.config.retry_after or max(1, math.ceil(window[0] + 1.0 - now))
            window.append(now)
        return None

    def server_error(self) -> int | None:
        if self.world.config.error_rate and self.roll() < self.world.config.error_rate:
            with self.lock:
                return self.rng.choice((500, 502, 503))
        return None


def _sim():
    return current_app.extensions["twin_sim"]


def error(status: int, message: str, details: dict | None = None, headers: dict | None = None):
    body = {"error": message}
    if details:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def endpoint(name: str, auth: bool = True, faults: bool = True):
    """Count the call by outcome, and apply the quirks in the order a gateway would."""
    def wrap(view):
        @functools.wraps(view)
        def inner(*args, **kwargs):
            world, tokens, quirks = _sim()
            arrived = time.time()
            response = _guard(name, auth, faults, world, tokens, quirks) or view(*args, **kwargs)
            world.log_call(name, str(response.status_code), arrived)
            return response
        return inner
    return wrap


def _guard(name, auth, faults, world: World, tokens: TokenStore, quirks: Quirks):
    config = world.config
    if config.slow_rate and quirks.roll() < config.slow_rate:
        time.sleep(config.slow_seconds)
    if auth:
        problem = _auth_problem(config, tokens)
        if problem:
            return error(401, problem)
    wait = quirks.retry_after(name)
    if wait is not None:
        return error(429, "Too Many Requests", headers={"Retry-After": str(wait)})
    status = quirks.server_error() if faults else None
    if status:
        return error(status, "Internal Server Error" if status == 500 else "Service Unavailable")
    return None


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _auth_problem(config: SimConfig, tokens: TokenStore) -> str | None:
    token = _bearer()
    if token and config.static_token and token == config.static_token:
        return None
    return tokens.check(token)


def _ttl(value, config: SimConfig) -> float:
    if value in (None, ""):
        return config.token_ttl
    ttl = float(value)
    if not 0 < ttl < math.inf:       # NaN fails this too; it would reach the token's exp as a 500
        raise ValueError
    return min(ttl, config.token_ttl)


# ---- iam ---------------------------------------------------------------------------------------
iam = Blueprint("iam", __name__)


@iam.post("/login")
@endpoint("login", auth=False, faults=False)
def login():
    world, tokens, _ = _sim()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error(400, "Body must be a JSON object")
    try:
        ttl = _ttl(body.get("ttl"), world.config)
    except (TypeError, ValueError):
        return error(422, "Validation failed", {"ttl": "must be a positive number of seconds"})
    if body.get("email") != world.config.login or body.get("password") != world.config.password:
        return error(401, "Invalid credentials")
    return jsonify(tokens.issue(body["email"], ttl, world.config.refresh_ttl, body.get("companyId")))


@iam.post("/refresh")
@endpoint("refresh", auth=False, faults=False)
def refresh():
    """The refresh token alone is the credential: TWIN's SDK sends the current token along, its
    integrations send none, so an Authorization header is neither needed nor checked."""
    world, tokens, _ = _sim()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error(400, "Body must be a JSON object")
    if not isinstance(body.get("refreshToken"), str) or not body["refreshToken"]:
        return error(422, "Validation failed", {"refreshToken": "is required"})
    try:
        ttl = _ttl(body.get("ttl"), world.config)
    except (TypeError, ValueError):
        return error(422, "Validation failed", {"ttl": "must be a positive number of seconds"})
    holder = tokens.use_refresh(body["refreshToken"])
    if holder is None:
        return error(401, "Invalid refresh token")
    subject, company_id = holder
    return jsonify(tokens.issue(subject, ttl, world.config.refresh_ttl, company_id))


@iam.get("/refresh")
@endpoint("refresh", auth=False, faults=False)
def refresh_by_get():
    """The SDK's pre-2023 `GET ?refreshToken=`: refused, and counted, as a client still using it should see."""
    return error(405, "Method Not Allowed", headers={"Allow": "POST"})


# ---- notify ------------------------------------------------------------------------------------
notify = Blueprint("notify", __name__)


@notify.post("/messages")
@endpoint("send")
def send():
    world: World = _sim()[0]
    body = request.get_json(silent=True)
    if body is None:
        return error(400, "Body must be JSON")
    try:
        validate_send(body)
    except Invalid as exc:
        return error(422, str(exc), exc.details)
    index = world.next_send_index()
    config = world.config
    if index in config.fail_sends:
        return error(503, "Service Unavailable")      # nothing taken
    answer = world.accept(body, index)
    if index in config.drop_after_accept_sends:
        _drop(config.drop_sleep)
    return jsonify(answer)


def _drop(sleep: float) -> None:
    """The messages are taken but the client never hears so: a long stall, or a cut connection."""
    if sleep > 0:
        time.sleep(sleep)
        return
    sock = request.environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ---- analyse -----------------------------------------------------------------------------------
analyse = Blueprint("analyse", __name__)


@analyse.get("/statistics/messaging/messages")
@endpoint("messages_stats")
def messages_stats():
    try:
        return jsonify(stats.messages_stats(request.args, _sim()[0]))
    except stats.BadQuery as exc:
        return error(422, str(exc), exc.details)


@analyse.get("/statistics/chat/sessions")
@endpoint("sessions_stats")
def sessions_stats():
    try:
        return jsonify(stats.sessions_stats(request.args, _sim()[0]))
    except stats.BadQuery as exc:
        return error(422, str(exc), exc.details)


# ---- control (no auth, no quirks: for tests and benchmarks) ------------------------------------
control = Blueprint("control", __name__)


@control.get("/truth")
def truth():
    return jsonify(stats.truth(_sim()[0]))


@control.get("/calls")
def calls():
    return jsonify(_sim()[0].calls())


@control.get("/call-log")
def call_log():
    return jsonify([{"at": stats.iso(at), "endpoint": name, "outcome": outcome}
                    for at, name, outcome in _sim()[0].call_log()])


@control.route("/config", methods=["GET", "POST"])
def config():
    world: World = _sim()[0]
    if request.method == "POST":
        changes = request.get_json(silent=True)
        if not isinstance(changes, dict):
            return error(400, "Body must be a JSON object")
        try:
            apply_config(world, changes)
        except (TypeError, ValueError) as exc:
            return error(422, str(exc))
    return jsonify(world.config.to_dict())


def apply_config(world: World, changes: dict) -> None:
    with world.lock:
        world.config = world.config.replace(changes)


@control.post("/expire-tokens")
def expire_tokens():
    _sim()[1].expire_all()
    return jsonify({"expired": True})


@control.get("/idle")
def idle():
    return jsonify({"idle": _sim()[0].idle()})


def create_app(world: World | SimConfig | None = None, tokens: TokenStore | None = None) -> Flask:
    """The WSGI app. Given a SimConfig (or nothing), it builds and starts its own World."""
    if not isinstance(world, World):
        world = World(world or SimConfig())
        world.start()
    tokens = tokens or TokenStore(world.config.seed)
    app = Flask(__name__)
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    app.extensions["twin_sim"] = (world, tokens, Quirks(world))
    app.register_blueprint(iam, url_prefix="/iam/api/v1/auth")
    app.register_blueprint(notify, url_prefix="/notify/api/v1")
    app.register_blueprint(analyse, url_prefix="/analyse/api/v1")
    app.register_blueprint(control, url_prefix="/_sim")
    app.register_error_handler(404, lambda e: error(404, "Not Found"))
    app.register_error_handler(405, lambda e: error(405, "Method Not Allowed"))
    return app
