"""The secrets an operator handles: rotating CALLBACK_TOKEN (a previous one accepted, queued sends go
out with the new URL), SEND_TOKEN apart from API_TOKEN, and generated tokens kept out of logs
(`show-token` for later; asking for help changes nothing)."""
from __future__ import annotations

import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from receiver import create_app, sending
from receiver.models import Message
from receiver.settings import SettingsError
from receiver.twin24 import TwinClient

from .support import API_TOKEN, CHAT_JSON, SEND_TOKEN, LiveServer, make_settings, settings_for

ROOT = Path(__file__).resolve().parents[1]
OLD_TOKEN = "old-callback-token-0123456789"
NEW_TOKEN = "new-callback-token-9876543210"


# ------------------------------------------------------------------------- rotating CALLBACK_TOKEN
def callback(message_id: str, status: str = "DELIVERED") -> dict:
    return {"id": message_id, "oldStatus": "PENDING", "newStatus": status, "callbackData": "rotation"}


def test_callbacks_with_the_previous_token_are_stored_and_counted(database_url, caplog):
    app = create_app(make_settings(database_url, callback_token=NEW_TOKEN, callback_token_previous=OLD_TOKEN))
    client = app.test_client()

    with caplog.at_level("INFO", logger="receiver"):
        late = client.post(f"/callbacks/{OLD_TOKEN}", json=callback("sent-before-rotation"))
        client.post(f"/callbacks/{OLD_TOKEN}", json=callback("sent-before-rotation-2"))
    current = client.post(f"/callbacks/{NEW_TOKEN}", json=callback("sent-after-rotation"))
    stranger = client.post("/callbacks/some-other-token-0123456789", json=callback("not-ours"))

    assert late.status_code == 200 and current.status_code == 200 and stranger.status_code == 404
    with app.app_context():
        stored = {m.id: m.status for m in Message.select()}
    assert stored == {"sent-before-rotation": "DELIVERED", "sent-before-rotation-2": "DELIVERED",
                      "sent-after-rotation": "DELIVERED"}
    metrics = client.get("/metrics").get_data(as_text=True)
    counted = [line for line in metrics.splitlines() if line.startswith("receiver_callbacks_previous_token_total")]
    assert counted and float(counted[0].split()[-1]) >= 2
    said = [r for r in caplog.records if "CALLBACK_TOKEN_PREVIOUS" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"]          # once, not once per callback
    assert OLD_TOKEN not in caplog.text and NEW_TOKEN not in caplog.text


def test_the_previous_token_is_a_secret_of_16_characters_or_more():
    with pytest.raises(SettingsError, match="CALLBACK_TOKEN_PREVIOUS: must be at least 16 characters"):
        make_settings("sqlite:///x.db", callback_token_previous="short")
    settings = make_settings("sqlite:///x.db", callback_token_previous=OLD_TOKEN)
    assert OLD_TOKEN not in repr(settings) and "callback_token_previous='***'" in repr(settings)


class Switchable:
    """A WSGI app that can be replaced while its server runs: the receiver before and after a restart."""

    def __init__(self):
        self.app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


@pytest.fixture
def receiver_server():
    target = Switchable()
    server = LiveServer(target).start()
    yield server, target
    server.stop()


def test_a_rotation_loses_no_callback_and_queued_sends_go_out_with_the_new_url(database_url, make_sim,
                                                                              receiver_server, send_headers):
    server, target = receiver_server
    # Callbacks come a second after a send: the restart happens in between, as with late DELIVERED ones.
    sim = make_sim(pending_after=(1.0, 1.0), final_after=(1.2, 1.2))
    before = create_app(settings_for(sim, database_url, callback_token=OLD_TOKEN, public_url=server.url))
    target.app = before
    client = before.test_client()
    body = {"chat": CHAT_JSON, "destinations": [{"phone": "79990000001"}, {"phone": "79990000002"}]}
    client.post("/api/sends", headers=send_headers, json={**body, "callbackData": "sent-before"})
    assert sending.send_pending(before.config["SETTINGS"], TwinClient(before.config["SETTINGS"])) == 2
    queued = client.post("/api/sends", headers=send_headers, json={**body, "callbackData": "queued-before"})
    assert queued.status_code == 202

    # The rotation: CALLBACK_TOKEN_PREVIOUS=<old>, CALLBACK_TOKEN=<new>, restart web and worker.
    after_settings = settings_for(sim, database_url, callback_token=NEW_TOKEN, callback_token_previous=OLD_TOKEN,
                                  public_url=server.url)
    target.app = create_app(after_settings)
    assert sending.send_pending(after_settings, TwinClient(after_settings)) == 2
    assert sim.wait_idle(timeout=20)

    urls = {t["callbackData"]: t["callbackUrl"] for t in sim.truth()}
    assert urls == {"sent-before": f"{server.url}/callbacks/{OLD_TOKEN}",
                    "queued-before": f"{server.url}/callbacks/{NEW_TOKEN}"}
    with target.app.app_context():
        finals = {(m.callback_data, m.status) for m in Message.select()}
    truth = {(t["callbackData"], t["finalStatus"]) for t in sim.truth()}
    assert finals == truth and len(sim.truth()) == 4          # every callback stored, old URL or new


# ------------------------------------------------------------------------------------ SEND_TOKEN
BODY = {"chat": CHAT_JSON, "destinations": [{"phone": "79990000001"}], "dryRun": True}


def test_sending_over_http_is_off_until_send_token_is_set(database_url):
    client = create_app(make_settings(database_url, send_token=None)).test_client()
    for headers in ({"Authorization": f"Bearer {API_TOKEN}"}, {}):
        answer = client.post("/api/sends", json=BODY, headers=headers)
        assert answer.status_code == 403
        assert answer.get_json() == {"error": "sending_off", "detail": "sending over HTTP is off: set SEND_TOKEN"}


def test_send_token_sends_and_api_token_reads(client, api_headers, send_headers):
    assert client.post("/api/sends", json=BODY, headers=api_headers).status_code == 401
    refused = client.post("/api/sends", json=BODY, headers=send_headers, query_string={"token": SEND_TOKEN})
    assert refused.status_code == 400                                  # a token in the URL, even the right one
    assert client.post("/api/sends", json=BODY, headers=send_headers).status_code == 200
    assert client.get("/api/results", headers=send_headers).status_code == 401
    assert client.get("/api/results", headers=api_headers).status_code == 200
    for headers in (api_headers, send_headers):        # a send's progress: either
        assert client.get("/api/sends/1", headers=headers).status_code == 404
    assert client.get("/api/sends/1").status_code == 401


def test_send_token_must_be_long_and_differ_from_the_api_token():
    with pytest.raises(SettingsError, match="SEND_TOKEN: must be at least 16 characters"):
        make_settings("sqlite:///x.db", send_token="short")
    with pytest.raises(SettingsError, match="SEND_TOKEN: must differ from API_TOKEN"):
        make_settings("sqlite:///x.db", send_token=API_TOKEN)
    assert SEND_TOKEN not in repr(make_settings("sqlite:///x.db"))


# ------------------------------------------------------------------- generated tokens, --help
def receiver_command(tmp_path: Path, *args: str, stderr=subprocess.PIPE, **env: str) -> subprocess.CompletedProcess:
    """`python -m receiver ...` as an operator runs it, in an empty directory (no .env), no tokens set."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CALLBACK_", "API_", "SEND_", "TWIN24_"))}
    environ.update(PYTHONPATH=str(ROOT), DATABASE_URL=f"sqlite:///{tmp_path}/data/receiver.db", **env)
    return subprocess.run([sys.executable, "-m", "receiver", *args], cwd=tmp_path, env=environ, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=60)


def stored_tokens(tmp_path: Path) -> dict[str, str]:
    with sqlite3.connect(tmp_path / "data" / "receiver.db") as connection:
        return dict(connection.execute("SELECT key, value FROM meta WHERE key LIKE '%token'"))


@pytest.mark.parametrize("args", [["--help"], [], ["send", "--help"], ["show-token", "--help"],
                                  ["rejected", "list", "--help"], ["worker", "--help"]])
def test_asking_for_help_changes_nothing(tmp_path, args):
    run = receiver_command(tmp_path, *args)

    assert run.returncode in (0, 2), run.stderr          # click: 2 for a group asked with no command
    assert "Usage:" in run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []                 # no database, no directory
    assert "generated" not in run.stderr
    if args == ["--help"]:
        assert "show-token" in run.stdout and "worker" in run.stdout


def test_generated_tokens_stay_out_of_a_log_and_show_token_prints_them(tmp_path):
    first = receiver_command(tmp_path, "init-db")          # stderr is a pipe: journald, docker logs
    assert first.returncode == 0, first.stderr
    tokens = stored_tokens(tmp_path)
    assert set(tokens) == {"callback_token", "api_token"}
    assert not any(token in first.stderr + first.stdout for token in tokens.values())
    assert first.stderr.count("python -m receiver show-token") == 2

    shown = receiver_command(tmp_path, "show-token", PUBLIC_URL="https://receiver.example")
    assert shown.returncode == 0, shown.stderr
    assert f"API token (Authorization: Bearer ...): {tokens['api_token']}" in shown.stdout
    assert f"https://receiver.example/callbacks/{tokens['callback_token']}" in shown.stdout
    assert "sending over HTTP (POST /api/sends): off" in shown.stdout
    assert "generated" not in shown.stderr


def test_generated_tokens_are_printed_to_a_terminal(tmp_path):
    main, terminal = pty.openpty()
    try:
        run = receiver_command(tmp_path, "init-db", stderr=terminal)
        os.close(terminal)
        terminal = None
        seen = read_all(main)
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(main)
    assert run.returncode == 0
    tokens = stored_tokens(tmp_path)
    assert f"API token (Authorization: Bearer ...): {tokens['api_token']}" in seen
    assert f"/callbacks/{tokens['callback_token']}" in seen


def read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:          # EIO: the other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_show_token_over_a_live_app_agrees_with_the_tokens_in_use(tmp_path):
    """The URL show-token prints is the one the callback endpoint takes."""
    receiver_command(tmp_path, "init-db")
    shown = receiver_command(tmp_path, "show-token").stdout
    url_path = shown.split("http://127.0.0.1:8000", 1)[1].split()[0]
    api_token = shown.split("Bearer ...): ", 1)[1].split()[0]
    settings = make_settings(f"sqlite:///{tmp_path}/data/receiver.db", callback_token=None, api_token=None)
    server = LiveServer(create_app(settings)).start()
    try:
        stored = requests.post(server.url + url_path, json=callback("m-1"), timeout=10)
        read = requests.get(server.url + "/api/messages", params={"id": "m-1"}, timeout=10,
                            headers={"Authorization": f"Bearer {api_token}"})
    finally:
        server.stop()
    assert stored.status_code == 200 and read.status_code == 200
    assert [m["id"] for m in read.json()["messages"]] == ["m-1"]
