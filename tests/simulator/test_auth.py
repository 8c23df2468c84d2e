import base64
import json
import time

import requests

from .helpers import WINDOW


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
