"""One error path for the JSON face (/api/ and /callbacks/): raise ApiError, and the handler the app
factory registers answers it as `{"error": reason, "parameter": ..., "detail": ..., ...}`."""
from __future__ import annotations

from flask import Flask, Response, jsonify


class ApiError(Exception):
    """A request the JSON face refuses: `status` (HTTP), `reason` (one word of a fixed vocabulary,
    the body's `error`), `detail` (a sentence for a person). `parameter` names the input at fault;
    `fields` are further keys of the body, `headers` go with the answer."""

    def __init__(self, status: int, reason: str, detail: str | None = None, *, parameter: str | None = None,
                 headers: dict[str, str] | None = None, **fields):
        super().__init__(detail or reason)
        self.status, self.reason, self.detail = status, reason, detail
        self.parameter, self.headers, self.fields = parameter, headers or {}, fields

    def as_json(self) -> dict:
        body: dict = {"error": self.reason}
        if self.parameter is not None:
            body["parameter"] = self.parameter
        if self.detail is not None:
            body["detail"] = self.detail
        return {**body, **self.fields}


def answer(error: ApiError) -> Response:
    """The JSON answer to an ApiError: the app's handler, and the answer of code that cannot raise
    (the handlers of routing errors)."""
    response = jsonify(error.as_json())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def register(app: Flask) -> None:
    app.register_error_handler(ApiError, answer)
