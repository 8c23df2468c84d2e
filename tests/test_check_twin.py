"""`python -m receiver check-twin` against the simulator and against TWIN's own example answers, over
real HTTP; and the worker's pointer to it when its first TWIN call fails."""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from receiver import create_app
from receiver.db import db, utcnow
from receiver.enrich import Enricher
from receiver.twin24 import TwinClient

from .support import send_body, settings_env, settings_for
from .twin24.example_twin import LOGIN, PASSWORD, ExampleTwin

ROOT = Path(__file__).resolve().parent.parent
SECRET_PASSWORD = "check-twin-password-42"
HINT = "run `python -m receiver check-twin`"
STEP = re.compile(r"^(login|refresh|message statistics|session statistics): (GET|POST) (\S+) -> (\d{3}) in \d+ ms: ")


class TokenCatcher:
    """Wraps the simulator's WSGI app and keeps every string its iam answers hold (tokens, refresh tokens)."""

    def __init__(self, flask_app) -> None:
        self.inner = flask_app.wsgi_app
        self.secrets: set[str] = set()
        flask_app.wsgi_app = self

    def __call__(self, environ, start_response):
        body = b"".join(self.inner(environ, start_response))
        if environ["PATH_INFO"].startswith("/iam/"):
            answer = json.loads(body)
            self.secrets.update(value for value in answer.values() if isinstance(value, str) and len(value) > 8)
        return [body]


@pytest.fixture
def login_sim(make_sim):
    sim = make_sim(static_token=None, password=SECRET_PASSWORD)
    sim.catcher = TokenCatcher(sim.app)
    return sim


def twin_settings(tmp_path, urls, **auth):
    return settings_for(urls, f"sqlite:///{tmp_path}/receiver.db", auth=None,
                        **{"twin24_connect_timeout": 1.0, "twin24_read_timeout": 5.0, **auth})


def check(settings):
    """Run the command as `python -m receiver check-twin` runs it: the app's CLI, these settings."""
    app = create_app(settings)
    try:
        result = app.test_cli_runner().invoke(args=["check-twin"])
    finally:
        if not db.is_closed():
            db.close()
    return result.exit_code, result.output.splitlines()


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret and secret not in text, f"a secret was printed: {secret[:4]}..."


# --------------------------------------------------------------------------- against the simulator
def test_with_login_each_step_is_one_line_and_the_verdict_is_ok(login_sim, tmp_path):
    settings = twin_settings(tmp_path, login_sim, twin24_login=login_sim.login, twin24_password=SECRET_PASSWORD)

    run = subprocess.run([sys.executable, "-m", "receiver", "check-twin"], cwd=ROOT, env=settings_env(settings),
                         capture_output=True, text=True, timeout=60)

    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [STEP.match(line).group(1, 2, 3, 4) for line in lines[:4]] == [
        ("login", "POST", f"{login_sim.auth_url}/login", "200"),
        ("refresh", "POST", f"{login_sim.auth_url}/refresh", "200"),
        ("message statistics", "GET", f"{login_sim.analyse_url}/statistics/messaging/messages", "200"),
        ("session statistics", "GET", f"{login_sim.analyse_url}/statistics/chat/sessions", "200")]
    assert lines[0].endswith(": token: str, refreshToken: str") and lines[1].endswith(": token: str, refreshToken: str")
    assert lines[2].endswith(": count: int, items: list[0]")
    assert lines[4:] == ["verdict: ok"]
    assert len(login_sim.catcher.secrets) == 4                      # two tokens, two refresh tokens
    assert_no_secret(run.stdout + run.stderr, SECRET_PASSWORD, *login_sim.catcher.secrets)
    assert "send" not in login_sim.calls() and login_sim.truth() == []


def test_the_items_twin_answers_with_are_described_by_key_and_type(login_sim, tmp_path):
    token = requests.post(f"{login_sim.auth_url}/login", timeout=5,
                          json={"email": login_sim.login, "password": SECRET_PASSWORD}).json()["token"]
    requests.post(f"{login_sim.notify_url}/messages", json=send_body(2), timeout=5,
                  headers={"Authorization": f"Bearer {token}"}).raise_for_status()
    assert login_sim.wait_idle(timeout=10)
    settings = twin_settings(tmp_path, login_sim, twin24_login=login_sim.login, twin24_password=SECRET_PASSWORD)

    code, lines = check(settings)

    assert code == 0 and lines[-1] == "verdict: ok"
    assert lines[2].endswith(": count: int, items: list[1] of {id: str, providerMessageId: str, status: str}")
    assert ": count: int, items: list[1] of {id: str, name: str" in lines[3]
    assert "dialogResultsFromBotJson: {" in lines[3]
    assert login_sim.calls()["send"] == {"200": 1}                  # still the one this test sent itself
    assert_no_secret("\n".join(lines), SECRET_PASSWORD, *login_sim.catcher.secrets)


def test_a_wrong_password_names_the_login_settings(login_sim, tmp_path):
    settings = twin_settings(tmp_path, login_sim, twin24_login=login_sim.login, twin24_password="wrong-password-77")

    code, lines = check(settings)

    assert code == 1
    assert STEP.match(lines[0]).group(1, 4) == ("login", "401") and lines[0].endswith(": error: str")
    assert len(lines) == 2 and lines[1].startswith("verdict: login: TWIN refused the login (HTTP 401: ")
    assert "TWIN24_LOGIN/TWIN24_PASSWORD" in lines[1]
    assert_no_secret("\n".join(lines), "wrong-password-77")


@pytest.mark.parametrize("analyse", ["wrong path", "closed port"])
def test_an_analyse_url_that_is_not_twins_names_twin24_analyse_url(login_sim, tmp_path, analyse, closed_port):
    url = f"{login_sim.url}/analyse/v1" if analyse == "wrong path" else f"http://127.0.0.1:{closed_port}/api/v1"
    settings = twin_settings(tmp_path, login_sim, twin24_login=login_sim.login, twin24_password=SECRET_PASSWORD,
                             twin24_analyse_url=url)

    code, lines = check(settings)

    assert code == 1
    assert [STEP.match(line).group(4) for line in lines[:2]] == ["200", "200"]     # login and refresh work
    expected = "-> 404 in" if analyse == "wrong path" else "-> no answer after"
    assert expected in lines[2] and expected in lines[3]
    assert lines[-1].startswith("verdict: message statistics: ")
    assert f"check TWIN24_ANALYSE_URL ({url})" in lines[-1]


def test_a_static_token_skips_login_and_refresh_and_is_never_printed(sim, tmp_path):
    settings = twin_settings(tmp_path, sim, twin24_token=sim.static_token)

    code, lines = check(settings)

    assert code == 0, lines
    assert lines[0] == "login: skipped: the static token TWIN24_TOKEN is used"
    assert lines[1] == "refresh: skipped: a static token (TWIN24_TOKEN) is never refreshed"
    assert [STEP.match(line).group(4) for line in lines[2:4]] == ["200", "200"]
    assert lines[4:] == ["verdict: ok"]
    assert_no_secret("\n".join(lines), sim.static_token)
    assert "login" not in sim.calls() and "send" not in sim.calls()


def test_a_refused_static_token_names_twin24_token(sim, tmp_path):
    settings = twin_settings(tmp_path, sim, twin24_token="not-the-right-token-31")

    code, lines = check(settings)

    assert code == 1 and "check TWIN24_TOKEN" in lines[-1]
    assert_no_secret("\n".join(lines), "not-the-right-token-31")


def test_without_credentials_it_names_the_settings_and_exits_2(sim, tmp_path):
    code, lines = check(twin_settings(tmp_path, sim))

    assert code == 2 and len(lines) == 1
    assert all(name in lines[0] for name in ("TWIN24_LOGIN", "TWIN24_PASSWORD", "TWIN24_TOKEN"))
    assert sim.calls() == {}


# --------------------------------------------------------------------------- against TWIN's example answers
@pytest.fixture
def example_twin():
    with ExampleTwin() as twin:
        yield twin


def example_settings(tmp_path, twin):
    return twin_settings(tmp_path, twin.urls, twin24_login=LOGIN, twin24_password=PASSWORD)


def test_a_login_answered_with_authtoken_only_still_works(example_twin, tmp_path):
    example_twin.login = lambda request: example_twin.pair(keys=("authToken", "refreshToken"))

    code, lines = check(example_settings(tmp_path, example_twin))

    assert code == 0, lines
    assert lines[0].endswith(": authToken: str, refreshToken: str")
    assert lines[2].endswith(": count: int, items: list[3] of {id: str, providerMessageId: str, status: str}")
    assert lines[3].endswith("dialogResultsFromBotJson: {nps: str, confirmation: str, initialVariables: list[0]}}")
    assert lines[-1] == "verdict: ok"


def test_a_login_answer_with_neither_key_names_the_keys_received(example_twin, tmp_path):
    example_twin.login = lambda request: (200, {"access": "secret-value-9", "expires": 3600})

    code, lines = check(example_settings(tmp_path, example_twin))

    assert code == 1 and len(lines) == 2
    assert lines[0].endswith(": access: str, expires: int")
    assert "keys received: access, expires" in lines[1] and "TWIN24_AUTH_URL" in lines[1]
    assert_no_secret("\n".join(lines), "secret-value-9", PASSWORD)


def test_a_refresh_refused_as_post_shows_the_get_that_worked(example_twin, tmp_path):
    example_twin.refresh_post = lambda request: (405, {"error": "Method Not Allowed"})
    example_twin.refresh_get = lambda request: example_twin.pair()

    code, lines = check(example_settings(tmp_path, example_twin))

    assert code == 0, lines
    assert [STEP.match(line).group(1, 2, 4) for line in lines[1:3]] == [("refresh", "POST", "405"),
                                                                      ("refresh", "GET", "200")]
    assert_no_secret("\n".join(lines), *[r for r in example_twin.issued.values()])


def test_a_refused_refresh_fails_the_check_and_says_the_worker_logs_in_instead(example_twin, tmp_path):
    example_twin.refresh_post = lambda request: (401, {"error": "Invalid refresh token"})

    code, lines = check(example_settings(tmp_path, example_twin))

    assert code == 1
    assert "refresh: TWIN refused the refresh (HTTP 401: Invalid refresh token)" in lines[-1]
    assert "logs in again" in lines[-1]
    assert [STEP.match(line).group(1) for line in lines[:-1]] == ["login", "refresh", "message statistics",
                                                                 "session statistics"]


# --------------------------------------------------------------------------- the worker's pointer to it
def test_the_worker_points_at_check_twin_once_when_its_first_twin_call_fails(settings, app, client, callback_path,
                                                                            caplog, closed_port):
    for n in range(2):
        client.post(callback_path, json={"id": f"m-{n}", "oldStatus": "PENDING", "newStatus": "DELIVERED"})
    unreachable = settings.__class__(**{**settings.__dict__, "twin24_token": "t" * 20, "twin24_retries": 0,
                                        "twin24_analyse_url": f"http://127.0.0.1:{closed_port}"})
    later = [utcnow()]
    enricher = Enricher(unreachable, TwinClient(unreachable), clock=lambda: later[0])

    with caplog.at_level(logging.WARNING, logger="receiver.enrich"):
        for _ in range(3):
            assert enricher.run_once(force=True) == 2               # claimed, TWIN failed, released
            later[0] += dt.timedelta(hours=1)                        # due again

    assert [r.getMessage() for r in caplog.records].count(
        "the worker's first TWIN call failed: run `python -m receiver check-twin` to see each step TWIN "
        "answers and which setting to look at") == 1


def test_a_worker_whose_first_twin_call_worked_does_not_point_at_check_twin(settings, app, client, callback_path,
                                                                           caplog, twin, closed_port):
    client.post(callback_path, json={"id": "m-1", "oldStatus": "PENDING", "newStatus": "DELIVERED"})
    later = [utcnow()]
    enricher = Enricher(settings, TwinClient(settings), clock=lambda: later[0])
    assert enricher.run_once(force=True) == 1                       # TWIN answered (m-1 is not there)
    unreachable = settings.__class__(**{**settings.__dict__, "twin24_retries": 0,
                                        "twin24_analyse_url": f"http://127.0.0.1:{closed_port}"})
    enricher.client = TwinClient(unreachable)
    later[0] += dt.timedelta(hours=1)

    with caplog.at_level(logging.WARNING, logger="receiver.enrich"):
        assert enricher.run_once(force=True) == 1

    assert "sweep failed" in caplog.text and HINT not in caplog.text
