"""TWIN's recipe, end to end, with TWIN's own example bodies (tests/examples/) instead of our simulator.

A TWIN stand-in answers every call with the recipe's example answer, unchanged: the login answer's shape,
the send answer, the message statistics (three items, one ours), the session statistics (three sessions,
one ours, with `"nps": "Тест"` and `"initialVariables": []`), and the wiki's status callback is POSTed
as TWIN would. The receiver must arrive at the recipe's own final table. The simulator is built from the
same notes as the client, so it cannot catch a wrong note; these bodies can.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest
from flask import Flask, jsonify, request

from receiver.db import db
from receiver.worker import Worker

from .support import LiveServer, TwinUrls, settings_for

EXAMPLES = Path(__file__).parent / "examples"
# The recipe's final table: messageId | chatId | result (the bot's `confirmation`).
RECIPE_TABLE = [("a06bc3d9-7980-4283-a5ec-77fb8133c50b", "15d2652c-ada6-4505-9dee-81ce77b528dc", "Отказ")]


def example(name: str):
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def jwt(lifetime: int = 86400) -> str:
    """A token shaped like TWIN's (a JWT whose payload has exp) for the login example's placeholder."""
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    now = int(time.time())
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'iat': now, 'exp': now + lifetime})}.c2ln"


class ExampleTwin:
    """Answers as the recipe's examples do, and keeps every request it got."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.lock = threading.Lock()
        app = Flask(__name__)
        app.json.ensure_ascii = False
        answers = {
            ("POST", "/iam/login"): lambda: {**example("login-answer.json"), "token": jwt()},
            ("POST", "/notify/messages"): lambda: example("send-answer.json"),
            ("GET", "/analyse/statistics/messaging/messages"): lambda: example("messages-statistics-answer.json"),
            ("GET", "/analyse/statistics/chat/sessions"): lambda: example("sessions-statistics-answer.json"),
        }

        @app.route("/<path:path>", methods=["GET", "POST"])
        def answer(path):
            with self.lock:
                self.requests.append((request.method, f"/{path}", request.get_json(silent=True)))
            make = answers.get((request.method, f"/{path}"))
            return (jsonify(make()), 200) if make else (jsonify(error="Not Found"), 404)

        self.server = LiveServer(app).start()

    def sent(self, method: str, path: str) -> list:
        with self.lock:
            return [body for m, p, body in self.requests if (m, p) == (method, path)]


@pytest.fixture
def example_twin():
    twin = ExampleTwin()
    yield twin
    twin.server.stop()


@pytest.fixture
def recipe_app(database_url, example_twin):
    from receiver import create_app
    url = example_twin.server.url
    settings = settings_for(TwinUrls(url), database_url, auth=None, twin24_login="you@example.com",
                            twin24_password="secret-password")
    app = create_app(settings)
    yield app
    if not db.is_closed():
        db.close()


def send_the_recipes_mailing(client, send_headers) -> None:
    recipe = example("send-request.json")["messages"][0]
    answer = client.post("/api/sends", headers=send_headers, json={
        "chat": recipe["channels"]["chat"], "callbackData": recipe["callbackData"],
        "destinations": recipe["destinations"]})
    assert answer.status_code == 202, answer.get_json()


def test_the_recipes_own_examples_give_the_recipes_final_table(recipe_app, example_twin, callback_path,
                                                                send_headers):
    client = recipe_app.test_client()
    worker = Worker.from_app(recipe_app)
    send_the_recipes_mailing(client, send_headers)
    worker.run(once=True)                                   # the worker sends it
    stored = client.post(callback_path, json=example("status-callback.json"))
    assert stored.status_code == 200, stored.get_json()

    for _ in range(5):                                      # chat id, then the bot's result
        worker.enricher.run_once(force=True)

    rows = list(db.execute_sql("SELECT message_id, phone, status, chat_id, result FROM results"))
    assert len(rows) == 1
    message_id, phone, status, chat_id, result = rows[0]
    assert [(message_id, chat_id, json.loads(result)["confirmation"])] == RECIPE_TABLE
    assert (phone, status) == ("74992868344", "DELIVERED")
    # The bot's answer as TWIN wrote it: a string nps, an empty map written as a list.
    assert json.loads(result) == {"nps": "Тест", "confirmation": "Отказ", "initialVariables": []}


def test_the_send_carries_every_field_of_the_recipes_request(recipe_app, example_twin, send_headers):
    client = recipe_app.test_client()
    send_the_recipes_mailing(client, send_headers)
    Worker.from_app(recipe_app).run(once=True)

    [logged_in] = example_twin.sent("POST", "/iam/login")
    assert set(logged_in) >= {"email", "password", "ttl"}
    [body] = example_twin.sent("POST", "/notify/messages")
    recipe = example("send-request.json")
    ours, theirs = body["messages"][0], recipe["messages"][0]
    assert set(ours) == set(theirs)
    assert ours["channels"] == theirs["channels"]
    assert ours["callbackData"] == theirs["callbackData"]
    assert ours["callbackUrl"].endswith(callback_path_of(recipe_app))
    assert ours["destinations"] == theirs["destinations"]


def callback_path_of(app) -> str:
    return f"/callbacks/{app.config['CALLBACK_TOKEN']}"
