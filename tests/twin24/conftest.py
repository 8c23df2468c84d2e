"""Fixtures for the TWIN client tests: a client that records calls (settings_for and Recorder are in tests/support.py)."""
from __future__ import annotations

import pytest

from receiver.twin24 import TwinClient

from ..support import Recorder


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

