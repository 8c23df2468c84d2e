"""The direct path (callbacks.DirectPath): the usual callback skips Flask's request handling and gets the
answer Flask's route gives it, headers included; every other request is Flask's, before anything is stored."""
from __future__ import annotations

import json
import logging

import pytest
from peewee import OperationalError
from werkzeug.test import Client, EnvironBuilder, run_wsgi_app

from receiver import callbacks, create_app
from receiver.models import Event, Message, Rejected

from .support import CALLBACK_TOKEN, callback_body, make_settings


def direct_path(app) -> callbacks.DirectPath:
    assert isinstance(app.wsgi_app, callbacks.DirectPath), "ProxyFix (TRUSTED_PROXIES) wraps it"
    return app.wsgi_app


@pytest.fixture
def flask_client(app):
    """A client of the same app without the direct path: every request goes through Flask's routing."""
    return Client(direct_path(app).flask_wsgi)


@pytest.fixture
def to_flask(app, monkeypatch):
    """The requests the direct path hands to Flask, as (method, path) in order."""
    path = direct_path(app)
    handed, flask_wsgi = [], path.flask_wsgi

    def counted(environ, start_response):
        handed.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        return flask_wsgi(environ, start_response)
    monkeypatch.setattr(path, "flask_wsgi", counted)
    return handed


def answer_of(response) -> tuple:
    return response.status, sorted(response.headers.items()), response.get_data()


def post(client, body, path=None, **options):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path or f"/callbacks/{CALLBACK_TOKEN}", data=data,
                       content_type=options.pop("content_type", "application/json"), **options)


def test_the_usual_answers_are_flasks_headers_and_all(client, flask_client):
    direct = [post(client, callback_body("d-1")), post(client, callback_body("d-1")),
              post(client, callback_body("d-2", price="a word"))]
    through_flask = [post(flask_client, callback_body("f-1")), post(flask_client, callback_body("f-1")),
                     post(flask_client, callback_body("f-2", price="a word"))]

    assert [answer_of(a) for a in direct] == [answer_of(a) for a in through_flask]
    assert [a.json for a in direct] == [{"stored": True, "duplicate": False}, {"stored": True, "duplicate": True},
                                        {"stored": True, "duplicate": False, "unreadable": ["price"]}]
    assert direct[0].headers["X-Content-Type-Options"] == "nosniff"
    stored = {m.id: (m.status, m.price) for m in Message.select()}
    assert stored == {"d-1": ("PENDING", 0.5), "d-2": ("PENDING", None), "f-1": ("PENDING", 0.5),
                      "f-2": ("PENDING", None)}
    assert Event.select().count() == 4


def test_the_usual_callback_never_reaches_flask(client, to_flask):
    for number in range(3):
        assert post(client, callback_body(f"m-{number}")).status_code == 200

    assert to_flask == []
    assert Message.select().count() == 3


def test_everything_else_is_flasks_and_a_refusal_is_kept_once(client, to_flask):
    path = f"/callbacks/{CALLBACK_TOKEN}"
    answers = [
        post(client, "{nope"),                                                  # refused as a whole
        post(client, {"newStatus": "PENDING"}),                                 # refused: no message id
        post(client, [callback_body("a-1"), callback_body("a-2")]),             # an array
        post(client, callback_body("x-1"), path="/callbacks/" + "x" * len(CALLBACK_TOKEN)),   # not the token
        post(client, callback_body("x-2"), path=path + "/"),                    # not the route
        client.get(path),                                                       # not POST
        post(client, b"x" * 70_000),                                            # over MAX_CONTENT_LENGTH
    ]

    assert [a.status_code for a in answers] == [400, 422, 200, 404, 404, 405, 413]
    assert len(to_flask) == len(answers)
    assert sorted(r.reason for r in Rejected.select()) == sorted(
        ["unparsable_json", "missing_field", "method_not_allowed", "payload_too_large"])
    assert sorted(m.id for m in Message.select()) == ["a-1", "a-2"]


def test_a_chunked_body_is_flasks(app, to_flask):
    builder = EnvironBuilder(path=f"/callbacks/{CALLBACK_TOKEN}", method="POST",
                             data=json.dumps(callback_body()), content_type="application/json")
    environ = builder.get_environ()
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True           # as gunicorn says of a chunked body it decodes

    _, status, _ = run_wsgi_app(app, environ, buffered=True)

    assert status.startswith("200")
    assert to_flask == [("POST", f"/callbacks/{CALLBACK_TOKEN}")]
    assert Message.get_by_id("m-1").status == "PENDING"


def test_a_body_shorter_than_its_content_length_is_answered_as_flask_answers_it(app):
    def answer(wsgi_app):
        data = json.dumps(callback_body()).encode()
        environ = EnvironBuilder(path=f"/callbacks/{CALLBACK_TOKEN}", method="POST", data=data,
                                 content_type="application/json").get_environ()
        environ["CONTENT_LENGTH"] = str(len(data) + 10)     # the client went away before the end
        body, status, headers = run_wsgi_app(wsgi_app, environ, buffered=True)
        return status, sorted(headers.items()), b"".join(body)

    assert answer(app) == answer(direct_path(app).flask_wsgi)


def test_a_store_that_fails_is_a_503_as_flask_answers_it(client, flask_client, monkeypatch, caplog):
    def failing(callback, sender):
        raise OperationalError("disk I/O error")
    monkeypatch.setattr(callbacks, "store_callback", failing)

    with caplog.at_level(logging.ERROR, logger="receiver.callbacks"):
        direct, through_flask = post(client, callback_body("d-1")), post(flask_client, callback_body("d-1"))

    assert direct.status_code == 503 and direct.headers["Retry-After"] == "5"
    assert answer_of(direct) == answer_of(through_flask)
    assert [r.getMessage() for r in caplog.records] == ["could not store callback for message d-1: disk I/O error"] * 2


def test_an_unexpected_error_is_logged_and_answered_500_as_from_a_view(app, flask_client, monkeypatch, caplog):
    app.config.update(TESTING=False, PROPAGATE_EXCEPTIONS=False)

    def broken(callback, sender):
        raise RuntimeError("a bug")
    monkeypatch.setattr(callbacks, "store_callback", broken)

    with caplog.at_level(logging.ERROR):
        direct = post(app.test_client(), callback_body())
        through_flask = post(flask_client, callback_body())

    assert direct.status_code == 500
    assert answer_of(direct) == answer_of(through_flask)
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert len(logged) == 2 and logged[0].getMessage() == logged[1].getMessage()


def test_an_unexpected_error_is_raised_when_testing(client, monkeypatch):
    def broken(callback, sender):
        raise RuntimeError("a bug")
    monkeypatch.setattr(callbacks, "store_callback", broken)

    with pytest.raises(RuntimeError, match="a bug"):
        post(client, callback_body())


def test_behind_a_trusted_proxy_the_client_address_is_the_forwarded_one(database_url):
    app = create_app(make_settings(database_url, trusted_proxies=1))
    app.config["TESTING"] = True

    answer = post(app.test_client(), callback_body(), headers={"X-Forwarded-For": "203.0.113.9"},
                  environ_base={"REMOTE_ADDR": "127.0.0.1"})

    assert answer.status_code == 200
    assert Event.get().remote_addr == "203.0.113.9"
