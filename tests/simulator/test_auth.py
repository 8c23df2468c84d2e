import base64
import json
import logging
import time

import pytest
import requests

from receiver.simulator import SimConfig
from receiver.simulator.callbacks import CallbackJob, CallbackSender

from .helpers import WINDOW, free_port


def login(sim, **body):
    payload = {"email": sim.login, "password": sim.password, "ttl": 3600, **body}
    return requests.post(sim.auth_url + "/login", json=payload, timeout=5)


def get_stats(sim, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(sim.analyse_url + "/statistics/messaging/messages", params=WINDOW,
                        headers=headers, timeout=5)


def refresh(sim, refresh_token, ttl=60, headers=None):
    body = {"refreshToken": refresh_token, "ttl": ttl}
    return requests.post(sim.auth_url + "/refresh", json=body, headers=headers or {}, timeout=5)


def jwt_payload(token):
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_login_gives_a_jwt_with_exp_that_works(sim):
    answer = login(sim, ttl=120)
    assert answer.status_code == 200
    tokens = answer.json()
    assert set(tokens) == {"token", "refreshToken"}               # TWIN's keys
    exp = jwt_payload(tokens["token"])["exp"]
    assert time.time() + 100 < exp <= time.time() + 120
    assert get_stats(sim, tokens["token"]).status_code == 200


def test_bad_password_and_missing_token_are_401(sim):
    bad = login(sim, password="nope")
    assert bad.status_code == 401 and "error" in bad.json()
    for token in (None, "garbage", "a.b.c"):
        answer = get_stats(sim, token)
        assert answer.status_code == 401 and answer.json() == {"error": "Unauthorized"}


def test_static_token_is_accepted_and_survives_expire_all(sim):
    assert get_stats(sim, sim.static_token).status_code == 200
    sim.expire_tokens()
    assert get_stats(sim, sim.static_token).status_code == 200


def test_token_expires_with_twins_text_then_refresh_gives_a_new_pair(sim):
    tokens = login(sim, ttl=0.3).json()
    assert get_stats(sim, tokens["token"]).status_code == 200
    time.sleep(0.4)
    expired = get_stats(sim, tokens["token"])
    assert expired.status_code == 401 and expired.json() == {"error": "Token is expired."}
    fresh = refresh(sim, tokens["refreshToken"], headers={"Authorization": f"Bearer {tokens['token']}"})
    assert fresh.status_code == 200 and set(fresh.json()) == {"token", "refreshToken"}
    assert jwt_payload(fresh.json()["token"])["exp"] <= time.time() + 60
    assert get_stats(sim, fresh.json()["token"]).status_code == 200
    # refresh tokens rotate: the old one is spent
    again = refresh(sim, tokens["refreshToken"])
    assert again.status_code == 401 and again.json() == {"error": "Invalid refresh token"}


@pytest.mark.parametrize("authorization", [None, "Bearer garbage", "{token}"])
def test_refresh_needs_no_authorization_header(sim, authorization):
    # TWIN's integrations send none, its SDK sends the current token (without "Bearer"): both work.
    tokens = login(sim).json()
    headers = {"Authorization": authorization.format(token=tokens["token"])} if authorization else {}
    fresh = refresh(sim, tokens["refreshToken"], headers=headers)
    assert fresh.status_code == 200
    assert jwt_payload(fresh.json()["token"])["sub"] == sim.login
    assert get_stats(sim, fresh.json()["token"]).status_code == 200


def test_refresh_by_get_is_refused_with_405_in_json(sim):
    tokens = login(sim).json()
    answer = requests.get(sim.auth_url + "/refresh", params={"refreshToken": tokens["refreshToken"], "ttl": 60},
                          headers={"Authorization": f"Bearer {tokens['token']}"}, timeout=5)
    assert answer.status_code == 405 and answer.json() == {"error": "Method Not Allowed"}
    assert answer.headers["Allow"] == "POST"
    assert refresh(sim, tokens["refreshToken"]).status_code == 200      # the GET spent nothing
    assert sim.calls()["refresh"] == {"405": 1, "200": 1}


@pytest.mark.parametrize("body, field", [({}, "refreshToken"), ({"refreshToken": ""}, "refreshToken"),
                                         ({"refreshToken": 5}, "refreshToken"),
                                         ({"refreshToken": "x", "ttl": "soon"}, "ttl")])
def test_a_refresh_body_without_a_usable_field_is_refused_naming_it(sim, body, field):
    answer = requests.post(sim.auth_url + "/refresh", json=body, timeout=5)
    assert answer.status_code == 422 and field in answer.json()["details"]


def test_a_refresh_body_that_is_not_a_json_object_is_refused(sim):
    answer = requests.post(sim.auth_url + "/refresh", data="refreshToken=x",
                           headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=5)
    assert answer.status_code == 400 and "error" in answer.json()


def test_refresh_keeps_the_company_of_the_login(sim):
    tokens = login(sim, companyId=42).json()
    fresh = refresh(sim, tokens["refreshToken"]).json()
    assert jwt_payload(fresh["token"])["companyId"] == 42


def test_login_ttl_is_capped_by_config(make_sim):
    sim = make_sim(token_ttl=60)
    token = login(sim, ttl=100000).json()["token"]
    assert jwt_payload(token)["exp"] <= time.time() + 60


def test_expire_tokens_over_http_expires_issued_tokens(sim):
    token = login(sim).json()["token"]
    assert requests.post(sim.url + "/_sim/expire-tokens", timeout=5).status_code == 200
    assert get_stats(sim, token).json() == {"error": "Token is expired."}
    assert sim.calls()["messages_stats"] == {"401": 1}


@pytest.mark.parametrize("ttl", [float("nan"), float("inf"), float("-inf")])
def test_a_ttl_that_is_not_a_finite_number_is_refused(sim, ttl):
    # NaN / Infinity: not JSON, but what Python's json (and so the simulator) reads.
    body = json.dumps({"email": sim.login, "password": sim.password, "ttl": ttl})
    refused = requests.post(sim.auth_url + "/login", data=body, headers={"Content-Type": "application/json"},
                            timeout=5)
    assert refused.status_code == 422
    assert refused.json()["details"] == {"ttl": "must be a positive number of seconds"}

    tokens = login(sim).json()
    body = json.dumps({"refreshToken": tokens["refreshToken"], "ttl": ttl})
    refreshed = requests.post(sim.auth_url + "/refresh", data=body, headers={"Content-Type": "application/json"},
                              timeout=5)
    assert refreshed.status_code == 422
    assert refreshed.json()["details"] == {"ttl": "must be a positive number of seconds"}


def test_a_failed_callback_is_logged_without_the_token_in_its_url(caplog):
    # The callback URL holds the receiver's callback token (a secret); the simulator's log may not.
    sender = CallbackSender(scheduler=None, config=lambda: SimConfig(callback_retries=0, callback_timeout=2),
                            count=lambda *_: None)
    url = f"http://127.0.0.1:{free_port()}/callbacks/secret-callback-token-0123456789?x=1"

    with caplog.at_level(logging.DEBUG, logger="receiver.simulator.callbacks"):
        sender._deliver(requests.Session(), CallbackJob(url, b"{}"))

    assert "callback to http://127.0.0.1:" in caplog.text
    assert "secret-callback-token" not in caplog.text and "/callbacks" not in caplog.text
