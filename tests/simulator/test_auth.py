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


def jwt_payload(token):
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_login_gives_a_jwt_with_exp_that_works(sim):
    answer = login(sim, ttl=120)
    assert answer.status_code == 200
    tokens = answer.json()
    assert set(tokens) >= {"authToken", "refreshToken"}
    exp = jwt_payload(tokens["authToken"])["exp"]
    assert time.time() + 100 < exp <= time.time() + 120
    assert get_stats(sim, tokens["authToken"]).status_code == 200


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
    assert get_stats(sim, tokens["authToken"]).status_code == 200
    time.sleep(0.4)
    expired = get_stats(sim, tokens["authToken"])
    assert expired.status_code == 401 and expired.json() == {"error": "Token is expired."}
    fresh = requests.get(sim.auth_url + "/refresh", params={"refreshToken": tokens["refreshToken"], "ttl": 60},
                         headers={"Authorization": f"Bearer {tokens['authToken']}"}, timeout=5)
    assert fresh.status_code == 200
    assert get_stats(sim, fresh.json()["authToken"]).status_code == 200
    # refresh tokens rotate: the old one is spent
    again = requests.get(sim.auth_url + "/refresh", params={"refreshToken": tokens["refreshToken"]},
                         headers={"Authorization": f"Bearer {tokens['authToken']}"}, timeout=5)
    assert again.status_code == 401


def test_login_ttl_is_capped_by_config(make_sim):
    sim = make_sim(token_ttl=60)
    token = login(sim, ttl=100000).json()["authToken"]
    assert jwt_payload(token)["exp"] <= time.time() + 60


def test_expire_tokens_over_http_expires_issued_tokens(sim):
    token = login(sim).json()["authToken"]
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
    refreshed = requests.get(sim.auth_url + "/refresh", params={"refreshToken": tokens["refreshToken"], "ttl": ttl},
                             headers={"Authorization": f"Bearer {tokens['authToken']}"}, timeout=5)
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
