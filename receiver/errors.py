"""One error path for the JSON face (/api/ and /callbacks/): raise ApiError, and the handler the app
factory registers answers it as `{"error": reason, "parameter": ..., "detail": ..., ...}`."""
from __future__ import annotations

from flask import Flask, Response, jsonify, request

from . import jsonbody


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


def bad_parameter(name: str, detail: str) -> ApiError:
    """A query parameter or body field this API does not take (400)."""
    return ApiError(400, "bad_parameter", detail, parameter=name)


def json_body(unsupported: str):
    """The request's JSON body: 415 (saying `unsupported`) for another media type, 400 for a body that
    is not JSON or nests too deeply to be anything this API takes."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", unsupported)
    try:
        return jsonbody.loads(request.get_data().decode("utf-8"), parse_float=jsonbody.number)
    except ValueError as error:         # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, "invalid_json", f"the body is not usable JSON: {error}") from None


def answer(error: ApiError) -> Response:
    """The JSON answer to an ApiError: the app's handler, and the answer of code that cannot raise
    (the handlers of routing errors)."""
    response = jsonify(error.as_json())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def register(app: Flask) -> None:
    app.register_error_handler(ApiError, answer)
