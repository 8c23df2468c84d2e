"""The client's auth against TWIN's own example answers (tests/examples/), served over real HTTP by
ExampleTwin: the shapes that the simulator, built from our own reading, might get wrong."""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from receiver.twin24 import TwinError

from ..support import Recorder, settings_for
from .example_twin import LOGIN, PASSWORD, ExampleTwin, example


@pytest.fixture
def example_twin():
    with ExampleTwin() as twin:
        yield twin


@pytest.fixture
def client(example_twin, make_client):
    settings = settings_for(example_twin.urls, auth=None, twin24_login=LOGIN, twin24_password=PASSWORD)
    return make_client(settings)


def window():
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now


def first_page(pages):
    return next(pages, [])


def expire_current_token(twin: ExampleTwin) -> None:
    twin.expired.update(twin.issued)


# --------------------------------------------------------------------------- login
def test_login_reads_token_from_twins_example_answer(example_twin, client):
    messages = first_page(client.iter_messages(*window()))
    sessions = first_page(client.iter_sessions(*window()))

    assert [m["id"] for m in messages] == [m["id"] for m in example("messages-statistics-answer.json")["items"]]
    assert sessions[0]["dialogResultsFromBotJson"] == {"nps": "Тест", "confirmation": "Отказ", "initialVariables": []}
    login = example_twin.seen[0]
    assert login["json"] == {"email": LOGIN, "password": PASSWORD, "ttl": 86400}    # a day, as TWIN's wiki asks
    token = next(iter(example_twin.issued))
    assert [call["authorization"] for call in example_twin.seen[1:]] == [f"Bearer {token}"] * 2
    assert example_twin.calls() == ["POST /iam/login", "GET /analyse/statistics/messaging/messages",
                                    "GET /analyse/statistics/chat/sessions"]


def test_a_login_answer_with_authtoken_only_still_works(example_twin, client):
    example_twin.login = lambda request: example_twin.pair(keys=("authToken", "refreshToken"))

    assert len(first_page(client.iter_messages(*window()))) == 3


def test_a_200_login_without_either_key_names_the_keys_it_got_never_their_values(example_twin, client, caplog):
    caplog.set_level(logging.DEBUG)
    example_twin.login = lambda request: (200, {"accessToken": "secret-value-1", "expires_in": 3600,
                                                "refresh_token": "secret-value-2"})

    with pytest.raises(TwinError) as caught:
        first_page(client.iter_messages(*window()))

    assert caught.value.endpoint == "login" and caught.value.status == 200
    assert "keys received: accessToken, expires_in, refresh_token" in str(caught.value)
    assert "secret-value" not in str(caught.value) and "secret-value" not in caplog.text
    assert example_twin.calls() == ["POST /iam/login"]          # nothing asked without a token


@pytest.mark.parametrize("answer", [[], "a-bare-token-string", {}])
def test_a_200_login_that_is_not_an_object_with_a_token_says_what_it_was(example_twin, client, answer):
    example_twin.login = lambda request: (200, answer)

    with pytest.raises(TwinError) as caught:
        first_page(client.iter_messages(*window()))

    assert "a-bare-token-string" not in str(caught.value)
    expected = "keys received: none" if answer == {} else f"answer is a JSON {type(answer).__name__}"
    assert expected in str(caught.value)


# --------------------------------------------------------------------------- refresh
def test_refresh_posts_the_refresh_token_in_a_json_body(example_twin, client):
    first_page(client.iter_messages(*window()))
    (token, refresh), = example_twin.issued.items()
    expire_current_token(example_twin)

    assert len(first_page(client.iter_messages(*window()))) == 3

    assert example_twin.calls() == [
        "POST /iam/login", "GET /analyse/statistics/messaging/messages",
        "GET /analyse/statistics/messaging/messages",               # 401: Token is expired.
        "POST /iam/refresh", "GET /analyse/statistics/messaging/messages"]
    posted = example_twin.seen[3]
    assert posted["json"] == {"refreshToken": refresh, "ttl": 86400} and posted["args"] == {}
    assert posted["authorization"] == f"Bearer {token}"
    new_token = list(example_twin.issued)[1]
    assert example_twin.seen[4]["authorization"] == f"Bearer {new_token}"


@pytest.mark.parametrize("refused", [404, 405])
def test_refresh_refused_as_post_falls_back_to_get_once_then_uses_get(example_twin, client, refused, caplog):
    caplog.set_level(logging.DEBUG)
    example_twin.refresh_post = lambda request: (refused, {"error": "Method Not Allowed"})
    example_twin.refresh_get = lambda request: example_twin.pair()
    first_page(client.iter_messages(*window()))
    refresh_tokens = []
    for _ in range(2):
        refresh_tokens.append(client._refresh_token)
        expire_current_token(example_twin)
        assert len(first_page(client.iter_messages(*window()))) == 3

    auth_calls = [call for call in example_twin.seen if call["path"].startswith("/iam/")]
    assert [f"{c['method']} {c['path']}" for c in auth_calls] == [
        "POST /iam/login", "POST /iam/refresh", "GET /iam/refresh", "GET /iam/refresh"]
    assert [c["args"] for c in auth_calls[2:]] == [{"refreshToken": r, "ttl": "86400"} for r in refresh_tokens]
    assert "refresh?refreshToken=***" in caplog.text                # urllib3 logs the URL: redacted
    assert not any(r in caplog.text for r in refresh_tokens)


def test_a_refresh_answer_without_a_refresh_token_keeps_the_one_held(example_twin, client):
    example_twin.refresh_post = lambda request: (200, {"token": example_twin.pair()[1]["token"]})
    first_page(client.iter_messages(*window()))
    (_, refresh), = example_twin.issued.items()
    for _ in range(2):
        expire_current_token(example_twin)
        assert len(first_page(client.iter_messages(*window()))) == 3

    posted = [call["json"] for call in example_twin.seen if call["path"] == "/iam/refresh"]
    assert posted == [{"refreshToken": refresh, "ttl": 86400}] * 2
    assert example_twin.calls().count("POST /iam/login") == 1


def test_a_failed_refresh_logs_in_again(example_twin, client):
    example_twin.refresh_post = lambda request: (401, {"error": "Invalid refresh token"})
    first_page(client.iter_messages(*window()))
    expire_current_token(example_twin)

    assert len(first_page(client.iter_messages(*window()))) == 3

    assert example_twin.calls() == [
        "POST /iam/login", "GET /analyse/statistics/messaging/messages",
        "GET /analyse/statistics/messaging/messages", "POST /iam/refresh",
        "POST /iam/login", "GET /analyse/statistics/messaging/messages"]


def test_a_refresh_answer_without_a_token_names_its_keys_and_logs_in_again(example_twin, make_client, caplog):
    caplog.set_level(logging.INFO, logger="receiver.twin24")
    example_twin.refresh_post = lambda request: (200, {"jwt": "secret-value-3"})
    recorder = Recorder()
    client = make_client(settings_for(example_twin.urls, auth=None, twin24_login=LOGIN,
                                      twin24_password=PASSWORD), on_call=recorder.on_call)
    first_page(client.iter_messages(*window()))
    expire_current_token(example_twin)

    assert len(first_page(client.iter_messages(*window()))) == 3

    assert "keys received: jwt" in caplog.text and "secret-value-3" not in caplog.text
    assert recorder.outcomes("refresh") == ["200"] and recorder.outcomes("login") == ["200", "200"]


def test_the_client_refresh_step_reports_a_refused_refresh(example_twin, client):
    example_twin.refresh_post = lambda request: (401, {"error": "Invalid refresh token"})
    client.log_in()

    with pytest.raises(TwinError) as caught:
        client.refresh()

    assert caught.value.endpoint == "refresh" and caught.value.status == 401
    assert example_twin.calls() == ["POST /iam/login", "POST /iam/refresh"]      # no login behind its back
