"""`make run` (scripts/run) as a new user starts it: gunicorn and the worker, with TWIN24_LOGIN and
TWIN24_PASSWORD, against the TWIN simulator with its default (faithful) behaviour. Every delivered
message must end with its chat id and the bot's result, as the simulator's ground truth has them."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from receiver.demo import free_port
from receiver.simulator import SimConfig, Simulator

from ..support import API_TOKEN, CALLBACK_TOKEN, FAST_TWIN, phones, send_mailing, wait_for
from .helpers import ROOT

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def faithful_twin():
    with Simulator(SimConfig(seed=5, **FAST_TWIN)).start() as twin:
        yield twin


def run_env(twin: Simulator, tmp_path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWIN24_", "ENRICH_", "DATABASE_", "CALLBACK_", "API_", "PUBLIC_", "GUNICORN_",
                                "PROMETHEUS_"))}
    env.update({
        "DATABASE_URL": f"sqlite:///{tmp_path}/data/receiver.db", "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CALLBACK_TOKEN": CALLBACK_TOKEN, "API_TOKEN": API_TOKEN,
        "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_ACCESS_LOG": "",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        # Only what a user puts in .env: a login, and where TWIN is.
        "TWIN24_LOGIN": twin.login, "TWIN24_PASSWORD": twin.password, "TWIN24_AUTH_URL": twin.auth_url,
        "TWIN24_NOTIFY_URL": twin.notify_url, "TWIN24_ANALYSE_URL": twin.analyse_url,
        # Look early: the production timings are seconds to minutes.
        "ENRICH_FIRST_CHECK": "0.2", "ENRICH_SWEEP_INTERVAL": "0.5", "ENRICH_RESULT_INTERVAL": "0.5",
        "ENRICH_MAX_WAIT": "1", "ENRICH_BACKOFF_START": "0.5", "ENRICH_BACKOFF_MAX": "1",
        "ENRICH_POLL_INTERVAL": "0.2",
    })
    return env


def enriched(base_url: str, truth: list[dict]) -> bool:
    answer = requests.get(f"{base_url}/api/results", params={"limit": 1000}, timeout=10,
                          headers={"Authorization": f"Bearer {API_TOKEN}"})
    rows = {row["message_id"]: row for row in answer.json()["results"]}
    for expected in truth:
        row = rows.get(expected["id"])
        if row is None or row["status"] != expected["finalStatus"]:
            return False
        if expected["finalStatus"] == "DELIVERED" and (
                row["chat_id"] != expected["sessionId"] or row["result"] != expected["result"]):
            return False
    return True


def test_make_run_with_a_login_enriches_every_delivered_message(faithful_twin, tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "run.log", "wb")
    # A usual umask (022): what scripts/run makes must be private anyway.
    process = subprocess.Popen(["bash", "-c", "umask 022 && exec scripts/run"], cwd=ROOT,
                               env=run_env(faithful_twin, tmp_path, port),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: _healthy(base_url), timeout=60), (tmp_path / "run.log").read_text()
        assert modes(tmp_path) == PRIVATE, (tmp_path / "run.log").read_text()[-3000:]
        send_mailing(faithful_twin, base_url, phones(20), callback_data="make-run")
        assert faithful_twin.wait_idle(timeout=30)

        settled = wait_for(lambda: enriched(base_url, faithful_twin.truth()), timeout=45, interval=0.5)

        assert settled, (tmp_path / "run.log").read_text()[-3000:]
        logins = faithful_twin.calls().get("login", {})
        assert logins.get("200", 0) >= 1, faithful_twin.calls()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert faithful_twin.password not in output
    assert CALLBACK_TOKEN not in output         # its output is a log here, not a terminal
    assert API_TOKEN not in output
    assert "Traceback" not in output


# What holds tokens, phone numbers and results is this user's alone: the database's directory and
# files (the -wal and -shm files are there while gunicorn and the worker run), the metrics directory.
PRIVATE = {"data": 0o700, "data/receiver.db": 0o600, "data/receiver.db-wal": 0o600,
           "data/receiver.db-shm": 0o600, "data/receiver.db-writers.lock": 0o600, "metrics": 0o700,
           "repository data": 0o700}


def modes(tmp_path) -> dict[str, int]:
    found = {str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777
             for path in [tmp_path / "data", *(tmp_path / "data").iterdir(), tmp_path / "metrics"]}
    found["repository data"] = (ROOT / "data").stat().st_mode & 0o777
    return found


def _healthy(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        time.sleep(0.2)
        return False
