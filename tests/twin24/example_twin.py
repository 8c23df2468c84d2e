"""ExampleTwin: TWIN's iam and analyse answering with TWIN's own example bodies (tests/examples/) over
real HTTP, a real JWT put where the example shows a placeholder; each answer can be scripted."""
from __future__ import annotations

import base64
import itertools
import json
import time
from pathlib import Path

from werkzeug.wrappers import Request, Response

from ..support import LiveServer, TwinUrls

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOGIN, PASSWORD = "user@example.com", "example-password-123"


def example(name: str):
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def jwt(subject: str, life: float = 600) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    now = int(time.time())
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': subject, 'iat': now, 'exp': now + life})}.c2ln"


class ExampleTwin:
    """TWIN's iam and analyse under /iam and /analyse, answering with the example bodies; a context
    manager serving them (`.url`, and the settings' URLs in `.urls`).

    `login`, `refresh_post` and `refresh_get` are functions of the request giving (status, body); the
    defaults issue pairs shaped like tests/examples/login-answer.json and refuse GET /refresh with 405.
    A token in `expired` is answered 401 "Token is expired." by the statistics."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.issued: dict[str, str] = {}          # token -> the refresh token issued with it
        self.expired: set[str] = set()
        self.seen: list[dict] = []
        self.login = lambda request: self.pair()
        self.refresh_post = lambda request: self.pair()
        self.refresh_get = lambda request: (405, {"error": "Method Not Allowed"})

    def pair(self, keys=("token", "refreshToken")) -> tuple[int, dict]:
        answer = example("login-answer.json")
        assert set(answer) == {"token", "refreshToken"}, "the example changed: look again"
        n = next(self.counter)
        token, refresh = jwt(f"user-{n}"), f"refresh-token-{n}-opaque"
        self.issued[token] = refresh
        values = {"token": token, "refreshToken": refresh, "authToken": token}
        return 200, {key: values[key] for key in keys}

    def __enter__(self) -> ExampleTwin:
        self.server = LiveServer(self).start()
        self.url = self.server.url
        self.urls = TwinUrls(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def calls(self) -> list[str]:
        return [f"{call['method']} {call['path']}" for call in self.seen]

    def __call__(self, environ, start_response):
        request = Request(environ)
        body = request.get_json(silent=True)
        self.seen.append({"method": request.method, "path": request.path, "args": dict(request.args),
                          "json": body, "authorization": request.headers.get("Authorization")})
        status, answer = self.route(request)
        return Response(json.dumps(answer, ensure_ascii=False), status=status,
                        content_type="application/json")(environ, start_response)

    def route(self, request: Request) -> tuple[int, object]:
        path, method = request.path, request.method
        if path == "/iam/login" and method == "POST":
            return self.login(request)
        if path == "/iam/refresh":
            return self.refresh_post(request) if method == "POST" else self.refresh_get(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.issued:
            return 401, {"error": "Unauthorized"}
        if token in self.expired:
            return 401, {"error": "Token is expired."}
        if path == "/analyse/statistics/messaging/messages":
            return 200, example("messages-statistics-answer.json")
        if path == "/analyse/statistics/chat/sessions":
            return 200, example("sessions-statistics-answer.json")
        return 404, {"error": "Not Found"}
