"""Helpers shared by tests: sending a mailing straight to the simulator, waiting for a condition."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from .conftest import CALLBACK_TOKEN


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
    import dataclasses
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith(("TWIN24_", "ENRICH_"))}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is not None:
            env[field.metadata["env"]] = str(value)
    return env


ROOT = Path(__file__).resolve().parents[1]


def start_worker(env: dict, log_path) -> subprocess.Popen:
    """`python -m receiver worker` with exactly `env`, its output appended to `log_path`."""
    return subprocess.Popen([sys.executable, "-m", "receiver", "worker"], cwd=ROOT, env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def reset_for_tests() -> None:
    """Drop every table and the results view (test fixtures, on throw-away databases only)."""
    from receiver.db import db
    from receiver.models import MODELS

    with db.connection_context():
        db.execute_sql("DROP VIEW IF EXISTS results")
        db.drop_tables(MODELS, safe=True)
