"""receiver/openapi.yaml: a valid OpenAPI 3 description, served, covering every route, and true of
what the service really answers (requests and responses checked with openapi-core)."""
from __future__ import annotations

import re

import pytest
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_spec_validator import validate
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from receiver import sending
from receiver.api import openapi_document
from receiver.twin24 import TwinClient

from .support import API_TOKEN, CALLBACK_PATH, SEND_TOKEN, seed_mailing

# Routes that are not part of the API: the results page and its files.
NOT_API = {"/", "/login", "/logout", "/results", "/results.csv", "/static/<path:filename>"}


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    return OpenAPI.from_dict(openapi_document())


def test_the_description_is_valid_openapi():
    validate(openapi_document())


def test_it_is_served(client):
    answer_ = client.get("/api/openapi.json")
    assert answer_.status_code == 200 and answer_.get_json() == openapi_document()


def test_every_route_is_described(app):
    documented = set(openapi_document()["paths"])
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)       # <int:send_id> -> {send_id}
        if rule.rule in NOT_API:
            continue
        assert path in documented, f"{rule.rule} is not in receiver/openapi.yaml"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if path.startswith("/callbacks/") and method != "POST":
                continue                # answered 405 (and kept), not an operation
            assert method.lower() in openapi_document()["paths"][path], f"{method} {rule.rule}"


def exchange(client, spec, method, path, *, valid_request=True, **kwargs):
    """Make the request; check the answer (and, for a valid request, the request) against the spec."""
    request = Request(EnvironBuilder(path=path, method=method, **kwargs).get_environ())
    response = client.open(path, method=method, **kwargs)
    response.get_data()              # a streamed body is read whole here
    if valid_request:
        spec.validate_request(WerkzeugOpenAPIRequest(request))
    spec.validate_response(WerkzeugOpenAPIRequest(request), WerkzeugOpenAPIResponse(response))
    return response


AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
SEND_AUTH = {"Authorization": f"Bearer {SEND_TOKEN}"}      # POST /api/sends
SEND = {"chat": {"chatId": "chat-1", "botId": "bot-1", "text": "Здравствуйте, {{name}}!"},
        "callbackData": "Опрос", "destinations": [{"phone": "79990000001", "variables": {"name": "Иван"}},
                                                   {"phone": "79990000002"}]}


def test_answers_match_the_description(client, spec):
    ids = seed_mailing(client, "Опрос", 4, undelivered=1,
                       answers=[{"confirmation": "Да", "nps": 9, "meta": {"a": [1]}}, {}, "plain text result"])

    cases = [
        ("GET", "/healthz", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/api/openapi.json", {}, 200),
        ("GET", "/api/messages", dict(query_string={"callbackData": "Опрос"}, headers=AUTH), 200),
        ("GET", "/api/messages", dict(query_string={"id": ids[0]}, headers=AUTH), 200),
        ("GET", "/api/results", dict(headers=AUTH), 200),
        ("GET", "/api/results", dict(query_string={"limit": 2, "status": "DELIVERED", "stage": "done",
                                                   "since": "2000-01-01", "until": "2100-01-01"},
                                     headers=AUTH), 200),
        ("GET", "/api/results.csv", dict(query_string={"callbackData": "Опрос", "excel": "1"},
                                         headers=AUTH), 200),
        ("GET", "/api/results/summary", dict(query_string={"bulkId": "bulk-1"}, headers=AUTH), 200),
        ("POST", CALLBACK_PATH, dict(json={"id": "new-1", "newStatus": "PENDING", "callbackData": "x",
                                           "price": 1.5, "partCount": 1}), 200),
        ("POST", CALLBACK_PATH, dict(data={"id": "new-2", "newStatus": "DELIVERED"}), 200),
        ("POST", CALLBACK_PATH, dict(json=[{"id": "new-3", "newStatusCode": 6}, {"id": "new-2", "newStatus": "DELIVERED"}]),
         200),
        ("POST", "/api/sends", dict(json={**SEND, "dryRun": True}, headers=SEND_AUTH), 200),
    ]
    for method, path, kwargs, status in cases:
        assert exchange(client, spec, method, path, **kwargs).status_code == status, (method, path)

    # a page with a cursor
    first = client.get("/api/results?limit=2", headers=AUTH).get_json()
    exchange(client, spec, "GET", "/api/results", query_string={"limit": 2, "cursor": first["next_cursor"]},
             headers=AUTH)


def test_refusals_match_the_description(client, spec):
    cases = [
        ("GET", "/api/results", dict(), 401),
        ("GET", "/api/results.csv", dict(headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}), 401),
        ("GET", "/api/results/summary", dict(), 401),
        ("GET", "/api/messages", dict(), 401),
        ("GET", "/api/results", dict(query_string={"token": API_TOKEN}, headers=AUTH), 400),
        ("GET", "/api/results", dict(query_string={"limit": 0}, headers=AUTH), 400),
        ("GET", "/api/results", dict(query_string={"cursor": "nope"}, headers=AUTH), 400),
        ("GET", "/api/results.csv", dict(query_string={"stage": "nope"}, headers=AUTH), 400),
        ("GET", "/api/messages", dict(headers=AUTH), 400),
        ("POST", "/callbacks/not-the-token", dict(json={"id": "1", "newStatus": "PENDING"}), 404),
        ("POST", CALLBACK_PATH, dict(data="{nope", content_type="application/json"), 400),
        ("POST", CALLBACK_PATH, dict(json={"newStatus": "PENDING"}), 422),
        ("POST", CALLBACK_PATH, dict(data="<x/>", content_type="application/xml"), 415),
        ("POST", CALLBACK_PATH, dict(json={"id": "1", "newStatus": "PENDING", "pad": "x" * 70000}), 413),
        # Outside the description, yet stored: unreadable optional fields, an array with a nameless item.
        ("POST", CALLBACK_PATH, dict(json={"id": "t-1", "newStatus": "PENDING", "price": "два", "partCount": {}}), 200),
        ("POST", CALLBACK_PATH, dict(json=[{"id": "t-2", "newStatusCode": 2}, {"newStatus": "PENDING"}]), 200),
        ("POST", CALLBACK_PATH, dict(json=[{"newStatus": "PENDING"}]), 422),
        ("POST", CALLBACK_PATH, dict(json=[]), 400),
        ("POST", "/api/sends", dict(json=SEND), 401),
        ("POST", "/api/sends", dict(json=SEND, headers=AUTH), 401),      # the reading token does not send
        ("POST", "/api/sends", dict(json={**SEND, "destinations": [{"phone": "12"}]}, headers=SEND_AUTH), 422),
        ("POST", "/api/sends", dict(json=SEND, headers=SEND_AUTH), 503),      # no TWIN credentials here
    ]
    for method, path, kwargs, status in cases:
        got = exchange(client, spec, method, path, valid_request=False, **kwargs)
        assert got.status_code == status, (method, path, got.status_code)


def test_sending_answers_match_the_description(twin, client, spec, settings):
    # `twin` gives the receiver TWIN credentials: the send is accepted, then the worker sends it.
    accepted = exchange(client, spec, "POST", "/api/sends", json=SEND, headers=SEND_AUTH)
    assert accepted.status_code == 202
    url = accepted.get_json()["url"]
    assert exchange(client, spec, "GET", url, headers=AUTH).get_json()["status"] == "queued"
    assert sending.send_pending(settings, TwinClient(settings)) == 2
    assert exchange(client, spec, "GET", url, headers=AUTH).get_json()["complete"]
    assert exchange(client, spec, "GET", "/api/sends/999", valid_request=False, headers=AUTH).status_code == 404
    assert exchange(client, spec, "GET", url, valid_request=False).status_code == 401
