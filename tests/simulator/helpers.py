"""Request helpers shared by the simulator tests."""
from __future__ import annotations

import json
import socket
import threading

import requests
from werkzeug.serving import WSGIRequestHandler, make_server

from receiver.simulator import Simulator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(sim: Simulator) -> dict:
    return {"Authorization": f"Bearer {sim.static_token}"}


def chat(**extra) -> dict:
    return {"chat": {"chatId": "chan-1", "botId": "bot-1", "messengerType": "WHATSAPP",
                     "chatSessionName": "Survey", "text": "Hello", **extra}}


def message(phones, callback_url=None, callback_data=None, **extra) -> dict:
    body = {"channels": chat(), "destinations": [
        {"phone": p, "variables": {"n": str(i)}} for i, p in enumerate(phones)], **extra}
    if callback_url:
        body["callbackUrl"] = callback_url
    if callback_data is not None:
        body["callbackData"] = callback_data
    return body


def phones(n: int, start: int = 0) -> list[str]:
    return [f"7999{start + i:07d}" for i in range(n)]


def send(sim: Simulator, *messages, **kwargs) -> requests.Response:
    return requests.post(sim.notify_url + "/messages", json={"messages": list(messages)},
                         headers=auth(sim), timeout=kwargs.get("timeout", 10))


WINDOW = {"from": "2000-01-01T00:00:00+00:00", "to": "2100-01-01T00:00:00+00:00"}


def stats(sim: Simulator, what: str, **params) -> requests.Response:
    path = {"messages": "/statistics/messaging/messages", "sessions": "/statistics/chat/sessions"}[what]
    return requests.get(sim.analyse_url + path, params={**WINDOW, **params}, headers=auth(sim), timeout=10)


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


class Receiver:
    """A tiny callback endpoint: records every body; `status` is what it answers."""

    def __init__(self, port: int = 0) -> None:
        self.bodies: list[dict] = []
        self.raw: list[bytes] = []
        self.status = 200
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", port, self._app, threaded=True, request_handler=_Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def _app(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length)
        with self.lock:
            status = self.status
            if status < 300:
                self.raw.append(data)
                self.bodies.append(json.loads(data))
        start_response(f"{status} X", [("Content-Type", "text/plain")])
        return [b"ok"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/cb"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
