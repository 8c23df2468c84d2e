"""The tests' support module: constants, settings, servers and helpers that test modules import.

conftest.py holds only fixtures (built from what is here); test modules import from here, never from
conftest. Also here: seeding results through the real callback endpoint, the webhook targets of the
forwarding tests (`RecordingTarget` verifies each delivery with the `standardwebhooks` package, not
with our code; `StalledTarget` accepts connections and never answers), the TWIN client tests'
`Recorder`, and running a worker as a child process.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg2
import requests
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook
from werkzeug.serving import WSGIRequestHandler, make_server

from receiver import sending
from receiver.db import db, utcnow
from receiver.models import MODELS, STAGE_DONE, Message, Outbox
from receiver.settings import Settings
from receiver.twin24 import TwinClient

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
BACKENDS = [b for b in os.environ.get("TEST_DATABASES", "sqlite,postgresql").split(",") if b]
# A TWIN whose messages live and die in tenths of a second.
FAST_TWIN = dict(pending_after=(0.01, 0.03), final_after=(0.02, 0.06), result_after=(0.05, 0.15),
                 callback_retry_delay=0.05, session_close_after=2.0)
CALLBACK_TOKEN = "test-callback-token-0123456789"
API_TOKEN = "test-api-token-0123456789abcdef"
SEND_TOKEN = "test-send-token-0123456789abcdef"
# TWIN settings of an app that takes sends in tests where no request calls TWIN.
TWIN_NEVER_CALLED = dict(twin24_token="never-used-no-request-calls-twin", twin24_notify_url="http://127.0.0.1:9")


# The simulator of the simulator, client and sending tests: quick lifecycles, sessions never close.
SIM_QUICK = dict(pending_after=(0.01, 0.03), final_after=(0.02, 0.05), result_after=(0.05, 0.1),
                 callback_retry_delay=0.05)


def postgres_unavailable() -> str | None:
    """Why PostgreSQL can't be used here, or None when it can."""
    try:
        psycopg2.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg2.OperationalError as error:
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {str(error).strip().splitlines()[0]}"
    return None


def make_settings(database_url: str, **overrides) -> Settings:
    """Settings as a deployment would have them, with timings short enough for tests."""
    values = dict(
        database_url=database_url, callback_token=CALLBACK_TOKEN, api_token=API_TOKEN, send_token=SEND_TOKEN,
        public_url="http://127.0.0.1:8000",
        enrich_first_check=0.0, enrich_sweep_interval=0.0, enrich_result_interval=0.0,
        enrich_batch_share=0.0, enrich_max_wait=0.0,
        enrich_poll_interval=0.05,
        enrich_backoff_start=0.05, enrich_backoff_max=0.5, enrich_window_margin=60.0,
        enrich_stale_after=3600.0,
        twin24_connect_timeout=2.0, twin24_read_timeout=5.0, twin24_max_retry_wait=1.0,
        metrics_cache_seconds=0.0,      # /metrics reads the database at every scrape (test_metrics tests the cache)
    )
    values.update(overrides)
    return Settings.from_env(environ={}, env_file=None, **values)


def settings_for(simulator, database_url: str | None = None, *, auth: str | None = "static",
                 **overrides) -> Settings:
    """Settings pointed at `simulator` (anything with auth_url, notify_url and analyse_url).

    With a database_url: a deployment's settings (make_settings). Without one: the TWIN side only, with
    the TWIN client tests' short timeouts. auth is "static" (the simulator's static token), "login"
    (its login and password) or None (none: give them in overrides).
    """
    values = dict(twin24_auth_url=simulator.auth_url, twin24_notify_url=simulator.notify_url,
                  twin24_analyse_url=simulator.analyse_url)
    if auth == "static":
        values["twin24_token"] = simulator.static_token
    elif auth == "login":
        values.update(twin24_login=simulator.login, twin24_password=simulator.password)
    if database_url is not None:
        return make_settings(database_url, **{**values, **overrides})
    values.update(twin24_connect_timeout=0.5, twin24_read_timeout=1.0, twin24_retries=3, twin24_max_retry_wait=2.0)
    return Settings.from_env(environ={}, env_file=None, **{**values, **overrides})


class TwinUrls:
    """The three TWIN URLs of a server that serves them as /iam, /notify and /analyse (for settings_for)."""

    def __init__(self, url: str) -> None:
        self.auth_url, self.notify_url, self.analyse_url = f"{url}/iam", f"{url}/notify", f"{url}/analyse"


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


class LiveServer:
    """A WSGI app served over real HTTP from a background thread."""

    def __init__(self, wsgi_app):
        self.server = make_server("127.0.0.1", 0, wsgi_app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


# Results: messages arrive through the real callback endpoint; chat_id/result are set directly
# where enrichment is not what is under test.

CALLBACK_PATH = f"/callbacks/{CALLBACK_TOKEN}"


def callback(client, message_id: str, status: str = "DELIVERED", callback_data: str | None = "mailing-1",
             bulk_id: str | None = "bulk-1", old_status: str | None = None) -> None:
    body = {"id": message_id, "newStatus": status, "oldStatus": old_status, "bulkId": bulk_id}
    if callback_data is not None:
        body["callbackData"] = callback_data
    answer = client.post(CALLBACK_PATH, json=body)
    assert answer.status_code == 200, answer.get_json()


def seed(client, count: int, prefix: str = "m", start: int = 0, **kwargs) -> list[str]:
    """`count` messages through the callback endpoint; their ids, in arrival order."""
    ids = [f"{prefix}{n:05d}" for n in range(start, start + count)]
    for message_id in ids:
        callback(client, message_id, **kwargs)
    return ids


def answer(message_id: str, result, chat_id: str | None = None) -> None:
    """What enrichment would store for a message whose bot answered `result`."""
    Message.update(chat_id=chat_id or f"chat-{message_id}", chat_id_at=utcnow(), stage=STAGE_DONE,
                   result=result if isinstance(result, str) else json.dumps(result, ensure_ascii=False),
                   result_at=utcnow()).where(Message.id == message_id).execute()


def seed_mailing(client, callback_data: str, delivered: int, undelivered: int = 0, answers=()) -> list[str]:
    """A mailing through the callback endpoint: `delivered` DELIVERED messages and `undelivered`
    UNDELIVERED ones (ids "u..."); `answers` go, in order, to the first delivered ones. The delivered ids."""
    ids = seed(client, delivered, callback_data=callback_data)
    seed(client, undelivered, prefix="u", callback_data=callback_data, status="UNDELIVERED")
    for message_id, result in zip(ids, answers, strict=False):
        answer(message_id, result)
    return ids


def bulk_messages(count: int, prefix: str = "bulk", first_seen_at: dt.datetime | None = None,
                  callback_data: str = "big", result=None, same_time: bool = False) -> list[str]:
    """Many rows at once, straight into the table (for volume tests, where callbacks would be slow)."""
    base = first_seen_at or dt.datetime(2025, 1, 1)
    text = None if result is None else json.dumps(result, ensure_ascii=False)
    ids = [f"{prefix}{n:06d}" for n in range(count)]
    rows = [{"id": message_id, "callback_data": callback_data, "status": "DELIVERED", "status_rank": 4,
             "first_seen_at": base if same_time else base + dt.timedelta(milliseconds=n),
             "last_seen_at": base, "stage": STAGE_DONE if text else "none", "result": text}
            for n, message_id in enumerate(ids)]
    for start in range(0, len(rows), 500):
        Message.insert_many(rows[start:start + 500]).execute()
    return ids


# Webhook targets for the forwarding tests: what a user's system at FORWARD_URL would be.

SIGNED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def make_secret(seed: str) -> str:
    """A "whsec_<base64>" secret, as the standardwebhooks library takes it."""
    return "whsec_" + base64.b64encode(seed.encode().ljust(32, b"-")[:32]).decode()


class RecordingTarget:
    """Records every delivery whose signature verifies (webhook-id, body, arrival time); answers 401
    to one that does not, 200 to the others once `hold` seconds have passed."""

    def __init__(self, secret: str, hold: float = 0.0):
        self.webhook = Webhook(secret)
        self.hold = hold
        self.lock = threading.Lock()
        self.received: list[dict] = []     # {"id", "body", "at"} in order of arrival
        self.refused: list[str] = []       # why a delivery failed verification
        self.torn: list[str] = []          # event ids whose body arrived cut short (its sender died)
        self.in_flight: dict[int, str] = {}    # request number -> webhook-id, while held
        self.server = LiveServer(self.wsgi)
        self.url = f"{self.server.url}/hooks"

    def start(self) -> RecordingTarget:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def wsgi(self, environ, start_response):
        expected = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(expected)
        headers = {name: environ.get("HTTP_" + name.upper().replace("-", "_"), "") for name in SIGNED_HEADERS}
        try:
            payload = self.webhook.verify(body, headers)
        except Exception as error:      # the library's own verdict: any failure is a refusal
            with self.lock:
                if len(body) < expected:
                    # A sender killed while the body was on its way: refusing it is right, and the
                    # event must come again whole (the tests check that it does).
                    self.torn.append(headers["webhook-id"])
                else:
                    self.refused.append(f"{headers['webhook-id']}: {error!r}")
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"bad signature"]
        with self.lock:
            number = len(self.received)
            self.received.append({"id": headers["webhook-id"], "body": payload, "raw": body.decode(),
                                  "at": time.time()})
            self.in_flight[number] = headers["webhook-id"]
        try:
            if self.hold:
                time.sleep(self.hold)
        finally:
            with self.lock:
                del self.in_flight[number]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"ok": True}).encode()]

    def held(self) -> set[str]:
        """The webhook-ids of the deliveries being held right now."""
        with self.lock:
            return set(self.in_flight.values())

    def deliveries(self) -> list[dict]:
        with self.lock:
            return list(self.received)


class StalledTarget:
    """Accepts every connection and never answers (nor closes it) until stopped."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hooks"
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> StalledTarget:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for connection in [*self.connections, self.listener]:
            connection.close()


class Recorder:
    """on_call and sleep hooks that remember what the client did."""

    def __init__(self, real_sleep: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.sleeps: list[float] = []
        self.real_sleep = real_sleep

    def on_call(self, endpoint: str, outcome: str) -> None:
        self.calls.append((endpoint, outcome))

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.real_sleep:
            time.sleep(seconds)

    def outcomes(self, endpoint: str) -> list[str]:
        return [outcome for name, outcome in self.calls if name == endpoint]


def send_body(count: int = 1, *, text: str = "Hello", start_phone: int = 79990000000) -> dict:
    return {"messages": [{
        "channels": {"chat": {"chatId": "chan-1", "botId": "bot-1", "messengerType": "WHATSAPP",
                              "chatSessionName": "test", "text": text, "provider": "TWIN"}},
        "callbackData": "cb-1",
        "destinations": [{"phone": str(start_phone + i), "messengerUserId": str(start_phone + i)}
                         for i in range(count)],
    }]}


# Shared by several test modules: callbacks, TWIN's truth, /metrics, pages, the CLI.

def callback_body(message_id="m-1", old="CREATED", new="PENDING", **extra):
    """A status callback's body as TWIN sends it (extra fields added or replaced)."""
    codes = {"CREATED": 1, "PENDING": 2, "DELIVERED": 6, "UNDELIVERED": 7, "ERROR": 8}
    body = {
        "id": message_id, "bulkId": "bulk-1", "groupId": "group-1", "flowId": "flow-1",
        "oldStatus": old, "newStatus": new,
        "oldStatusCode": codes.get(old), "newStatusCode": codes.get(new),
        "price": 0.5, "partCount": 1, "callbackData": "mailing-7",
    }
    body.update(extra)
    return body


def assert_matches_truth(twin, stored, ids):
    """Each of `ids` stored (`stored`: id -> Message) as the simulator says it ended: status, chat, result."""
    truth = {t["id"]: t for t in twin.truth()}
    for message_id in ids:
        expected, message = truth[message_id], stored[message_id]
        assert message.status == expected["finalStatus"], message_id
        if expected["finalStatus"] != "DELIVERED":
            continue
        assert message.chat_id == expected["sessionId"], message_id
        if expected["result"]:
            assert message.stage == "done", (message_id, message.given_up_reason)
            assert json.loads(message.result) == expected["result"], message_id
            assert message.result_at is not None


def all_settled():
    """No message is left to enrich."""
    return Message.select().where(Message.stage.not_in(["done", "given_up"])).count() == 0


def scrape(client, **headers) -> dict:
    """GET /metrics: {(sample name, sorted labels): value}."""
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    """One sample of a scrape (0.0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def basic(password: str, user: str = "anyone") -> dict:
    """HTTP Basic authorization headers."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def run_command(settings, *args):
    """`python -m receiver ARGS` in a child process with these settings; the finished process."""
    return subprocess.run([sys.executable, "-m", "receiver", *args], cwd=ROOT, env=settings_env(settings),
                          capture_output=True, text=True, timeout=60)


# Sending: the simulator, the `send` command and POST /api/sends (tests/test_sending*.py and others).

# Lifecycles far in the future: no callbacks while a test runs, unless it asks for them.
QUIET = dict(pending_after=(60.0, 60.0), final_after=(60.0, 60.0))
# The chat settings of a mailing: as arguments of the `send` command, and as JSON.
CHAT = ["--chat-id", "chan-1", "--bot-id", "bot-1", "--text", "Hello {{name}}",
        "--chat-session-name", "spring", "--callback-data", "campaign-1"]
CHAT_JSON = {"chatId": "chan-1", "botId": "bot-1", "text": "Hello", "chatSessionName": "spring"}

REFUSAL = "Recipient 79990000001 cannot receive messages on this channel"     # the simulator's message


def closed_port() -> int:
    """A local port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sim_settings(database_url, sim, **overrides):
    """Settings at `sim` that give up fast (short timeouts, one retry), with a PUBLIC_URL nothing answers at."""
    values = dict(twin24_connect_timeout=0.5, twin24_read_timeout=1.0, twin24_retries=1,
                  twin24_max_retry_wait=0.05, public_url=f"http://127.0.0.1:{closed_port()}")
    return settings_for(sim, database_url, **{**values, **overrides})


def csv_text(count: int, start: int = 79990000000) -> str:
    rows = ["phone,messengerUserId,name,age"]
    rows += [f"+{start + i},{start + i},Name {i},{20 + i % 50}" for i in range(count)]
    return "\n".join(rows) + "\n"


def write(tmp_path, text: str, name: str = "list.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_cli(app, *args):
    """`flask send ARGS` on `app`."""
    # `flask` pushes an app context for every command; the test runner does not.
    with app.app_context():
        return app.test_cli_runner().invoke(args=["send", *args])


def sends_per_phone(sim) -> Counter:
    return Counter(item["phone"] for item in sim.truth())


def send_requests(sim) -> int:
    return sum(sim.calls().get("send", {}).values())


def outbox_states() -> Counter:
    return Counter(state for (state,) in Outbox.select(Outbox.state).tuples())


def worker_pass(app) -> int:
    """What the worker loop does for POST /api/sends, with a client like the worker's."""
    settings = app.config["SETTINGS"]
    return sending.send_pending(settings, TwinClient(settings))


def api_body(count: int, **extra) -> dict:
    return {"chat": CHAT_JSON, "callbackData": "api-1",
            "destinations": [{"phone": f"+7999000000{i}", "variables": {"n": str(i)}} for i in range(count)],
            **extra}


def send_mailing(twin, receiver_url: str, phones: list[str], callback_data: str = "mailing-1") -> list[str]:
    """Send one mailing to the simulator with the receiver as callbackUrl; the message ids, in order."""
    body = {"messages": [{
        "channels": {"chat": {"chatId": "chat-channel-1", "botId": "bot-1", "messengerType": "WHATSAPP",
                              "chatSessionName": "Опрос", "text": "Здравствуйте!", "provider": "TWIN"}},
        "callbackUrl": f"{receiver_url}/callbacks/{CALLBACK_TOKEN}",
        "callbackData": callback_data,
        "destinations": [{"phone": phone, "variables": {"n": str(n)}} for n, phone in enumerate(phones)],
    }]}
    answer = requests.post(f"{twin.notify_url}/messages", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {twin.static_token}"})
    answer.raise_for_status()
    return [item["id"] for item in answer.json()]


def phones(count: int, start: int = 0) -> list[str]:
    return [f"7999{start + n:07d}" for n in range(count)]


def wait_for(condition, timeout: float = 20.0, step=None, interval: float = 0.05):
    """Call `step` (if any) and check `condition` until it holds; the condition's last value."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def settings_env(settings) -> dict[str, str]:
    """The environment variables that make a child process build these same settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TWIN24_", "ENRICH_"))}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is not None:
            env[field.metadata["env"]] = str(value)
    return env


def stop_worker(worker: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, as systemd stops the worker; its exit code once it has stopped."""
    worker.send_signal(signal.SIGTERM)
    return worker.wait(timeout=timeout)


def kill_if_running(worker: subprocess.Popen | None) -> None:
    """For a test's `finally`: a worker still running (the test failed before it stopped) is killed."""
    if worker is not None and worker.poll() is None:
        worker.kill()
        worker.wait(timeout=10)


ROOT = Path(__file__).resolve().parents[1]


def start_worker(env: dict, log_path) -> subprocess.Popen:
    """`python -m receiver worker` with exactly `env`, its output appended to `log_path`."""
    return subprocess.Popen([sys.executable, "-m", "receiver", "worker"], cwd=ROOT, env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def reset_for_tests() -> None:
    """Drop every table and the results view (test fixtures, on throw-away databases only)."""
    with db.connection_context():
        db.execute_sql("DROP VIEW IF EXISTS results")
        db.drop_tables(MODELS, safe=True)
