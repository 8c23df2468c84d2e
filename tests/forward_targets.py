"""Webhook targets for the forwarding tests: what a user's system at FORWARD_URL would be.

`RecordingTarget` verifies each delivery with the `standardwebhooks` package (not with our code),
records it and answers 200, optionally after holding the request open (so a test can kill the worker
while a delivery is in flight). `StalledTarget` accepts connections and never answers.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time

from standardwebhooks import Webhook

from .conftest import LiveServer

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
