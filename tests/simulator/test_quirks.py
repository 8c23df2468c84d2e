import subprocess
import sys
import time

import requests

from .helpers import message, phones, send, stats


def test_rate_limit_answers_429_with_retry_after(make_sim):
    sim = make_sim(rate_limit=3)
    answers = [stats(sim, "messages") for _ in range(6)]
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200] * 3 and 429 in codes
    limited = next(a for a in answers if a.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    # per endpoint: sessions are not limited by the message calls
    assert stats(sim, "sessions").status_code == 200
    assert sim.calls()["messages_stats"]["429"] == codes.count(429)


def test_error_rate_gives_5xx_on_analyse(make_sim):
    sim = make_sim(error_rate=1.0)
    assert {stats(sim, "sessions").status_code for _ in range(10)} <= {500, 502, 503}


def test_slow_answers(make_sim):
    sim = make_sim(slow_rate=1.0, slow_seconds=0.3)
    start = time.monotonic()
    assert stats(sim, "messages").status_code == 200
    assert time.monotonic() - start >= 0.3


def test_configure_at_run_time_over_http(sim):
    answer = requests.post(sim.url + "/_sim/config", json={"error_rate": 1.0}, timeout=5)
    assert answer.status_code == 200 and answer.json()["error_rate"] == 1.0
    assert stats(sim, "messages").status_code >= 500
    sim.configure(error_rate=0.0)
    assert stats(sim, "messages").status_code == 200
    assert requests.post(sim.url + "/_sim/config", json={"nope": 1}, timeout=5).status_code == 422


def test_idle_endpoint(sim):
    send(sim, message(phones(3)))
    assert requests.get(sim.url + "/_sim/idle", timeout=5).json() == {"idle": False}
    assert sim.wait_idle(5)
    assert requests.get(sim.url + "/_sim/idle", timeout=5).json() == {"idle": True}


def test_cli_prints_its_url_and_serves(tmp_path):
    config = tmp_path / "sim.json"
    config.write_text('{"static_token": "cli-token"}')
    process = subprocess.Popen(
        [sys.executable, "-m", "receiver.simulator", "--port", "0", "--seed", "3",
         "--config", str(config), "--set", "page_cap=10", "--set", "shuffle=true"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        settings = requests.get(url + "/_sim/config", timeout=5).json()
        assert settings["page_cap"] == 10 and settings["shuffle"] is True and settings["seed"] == 3
        assert settings["static_token"] == "cli-token"
    finally:
        process.terminate()
        process.wait(5)
