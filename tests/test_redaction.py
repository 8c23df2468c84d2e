"""No log line shows the callback token (current or previous), whatever echoes it; phone numbers stay
out of the worker's log."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from receiver import create_app

from .support import CHAT_JSON, LiveServer, make_settings, settings_env

ROOT = Path(__file__).resolve().parents[1]
OLD_TOKEN = "old-callback-token-0123456789"
NEW_TOKEN = "new-callback-token-9876543210"
PHONE = "79991234567"


def echoing_twin(environ, start_response):
    """A TWIN that refuses the send and echoes the callbackUrl it got, PHP's way (\\/ for /)."""
    body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
    url = body["messages"][0]["callbackUrl"]
    start_response("400 Bad Request", [("Content-Type", "text/plain")])
    return [json.dumps({"message": f"{url} is not reachable"}).replace("/", "\\/").encode()]


def test_the_workers_log_shows_no_callback_token_and_no_phone(database_url, tmp_path, send_headers):
    twin = LiveServer(echoing_twin).start()
    try:
        settings = make_settings(database_url, callback_token=NEW_TOKEN, callback_token_previous=OLD_TOKEN,
                                 twin24_token="static-twin-token-0123", twin24_notify_url=twin.url,
                                 twin24_auth_url=twin.url, twin24_analyse_url=twin.url, twin24_retries=0)
        app = create_app(settings)
        queued = app.test_client().post("/api/sends", headers=send_headers, json={
            "chat": CHAT_JSON, "destinations": [{"phone": PHONE}], "callbackData": "echo"})
        assert queued.status_code == 202
        env = settings_env(settings) | {"PYTHONPATH": str(ROOT)}
        worker = subprocess.run([sys.executable, "-m", "receiver", "worker", "--once"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
    finally:
        twin.stop()

    log = worker.stdout + worker.stderr
    assert "stopped: TWIN refused the request" in log and "callbacks" in log, log   # the echo is logged...
    assert NEW_TOKEN not in log and OLD_TOKEN not in log                            # ...without the token
    assert PHONE not in log and PHONE[1:] not in log


def test_a_receiver_log_record_is_redacted_message_and_traceback(database_url, caplog):
    with caplog.at_level(logging.INFO):
        create_app(make_settings(database_url, callback_token=NEW_TOKEN, callback_token_previous=OLD_TOKEN))
        log = logging.getLogger("receiver.sending")
        log.warning("TWIN said: %s", f"https:\\/\\/x.example\\/callbacks\\/{OLD_TOKEN} is unknown")
        try:
            raise RuntimeError(f"POST https://x.example/callbacks/{NEW_TOKEN}?a=1 failed")
        except RuntimeError:
            log.exception("send failed")
    handler = caplog.handler
    text = "\n".join(handler.format(record) for record in caplog.records)

    assert "TWIN said:" in text and "RuntimeError" in text and "/callbacks/***" in text
    assert OLD_TOKEN not in text and NEW_TOKEN not in text
