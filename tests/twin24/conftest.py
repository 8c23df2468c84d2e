"""Fixtures for the TWIN client tests: fast settings aimed at a simulator, a client that records calls."""
from __future__ import annotations

import socket

import pytest

from receiver.settings import Settings
from receiver.twin24 import TwinClient


def settings_for(sim, *, auth="static", **overrides) -> Settings:
    """Fast settings aimed at `sim`; auth is "static", "login", or None (set it in overrides)."""
    values = dict(twin24_auth_url=sim.auth_url, twin24_notify_url=sim.notify_url,
                  twin24_analyse_url=sim.analyse_url, twin24_connect_timeout=0.5,
                  twin24_read_timeout=1.0, twin24_retries=3, twin24_max_retry_wait=2.0)
    if auth == "static":
        values["twin24_token"] = sim.static_token
    elif auth == "login":
        values.update(twin24_login=sim.login, twin24_password=sim.password)
    values.update(overrides)
    return Settings.from_env(environ={}, env_file=None, **values)


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
            import time
            time.sleep(seconds)

    def outcomes(self, endpoint: str) -> list[str]:
        return [outcome for name, outcome in self.calls if name == endpoint]


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def make_client(recorder):
    clients = []

    def make(settings, **kwargs) -> TwinClient:
        kwargs.setdefault("on_call", recorder.on_call)
        kwargs.setdefault("sleep", recorder.sleep)
        client = TwinClient(settings, **kwargs)
        client.backoff_base = 0.01
        clients.append(client)
        return client

    yield make
    for client in clients:
        client._session.close()


@pytest.fixture
def closed_port():
    """A local port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return port


def send_body(count: int = 1, *, text: str = "Hello", start_phone: int = 79990000000) -> dict:
    return {"messages": [{
        "channels": {"chat": {"chatId": "chan-1", "botId": "bot-1", "messengerType": "WHATSAPP",
                              "chatSessionName": "test", "text": text, "provider": "TWIN"}},
        "callbackData": "cb-1",
        "destinations": [{"phone": str(start_phone + i), "messengerUserId": str(start_phone + i)}
                         for i in range(count)],
    }]}
