"""Fixtures: real apps on throw-away databases, and a real TWIN simulator.

Every test that asks for `database_url` (directly or through `settings`, `app`, `client`) runs
twice: on a SQLite file of its own and on PostgreSQL, in a schema of its own. Where PostgreSQL
cannot be reached (a fresh laptop), the PostgreSQL runs are skipped with the reason printed.
Set TEST_POSTGRES_URL to point them elsewhere, or TEST_DATABASES=sqlite to run one backend.
Only fixtures live here; what they are built from (and what test modules import) is in support.py.
"""
from __future__ import annotations

import os
import threading
import uuid

import psycopg2
import pytest

from receiver import create_app
from receiver.db import bind, db
from receiver.simulator import SimConfig, Simulator

from .support import (
    API_TOKEN,
    BACKENDS,
    CALLBACK_TOKEN,
    FAST_TWIN,
    POSTGRES_URL,
    SEND_TOKEN,
    SIM_QUICK,
    TWIN_NEVER_CALLED,
    LiveServer,
    closed_port,
    make_settings,
    postgres_unavailable,
    reset_for_tests,
    settings_for,
    sim_settings,
)


@pytest.fixture(scope="session")
def postgres_schema_url():
    """A schema of this test process's own, so that parallel runs on one server don't collide."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    schema = f"t_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    connection = psycopg2.connect(POSTGRES_URL)
    connection.autocommit = True
    connection.cursor().execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    connection.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    connection.close()


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/receiver.db"
        return
    url = request.getfixturevalue("postgres_schema_url")
    yield url
    # The next test starts from nothing: drop what this one made.

    bind(make_settings(url))
    reset_for_tests()
    db.close()


@pytest.fixture
def sim_defaults(request) -> dict:
    """SimConfig values of `make_sim`: SIM_QUICK's, or a test module's SIM_DEFAULTS (the sending tests'
    are QUIET); a test folder overrides this fixture to change them."""
    return {"seed": 1, **getattr(request.module, "SIM_DEFAULTS", SIM_QUICK)}


@pytest.fixture(scope="session")
def _sim_stoppers():
    """Simulators stop in the background (a stop waits out the server's 0.5 s poll); joined at the end."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(10)


@pytest.fixture
def make_sim(sim_defaults, _sim_stoppers):
    """make_sim(**overrides) -> a started Simulator, stopped after the test."""
    started = []

    def make(**overrides) -> Simulator:
        sim = Simulator(SimConfig(**{**sim_defaults, **overrides})).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        thread = threading.Thread(target=sim.stop, daemon=True)
        thread.start()
        _sim_stoppers.append(thread)


@pytest.fixture
def sim(make_sim):
    return make_sim()


@pytest.fixture(name="closed_port")
def closed_port_fixture() -> int:
    """A local port nothing listens on (bound then released)."""
    return closed_port()


@pytest.fixture
def make_sim_app(database_url):
    def make(sim, **overrides):
        app = create_app(sim_settings(database_url, sim, **overrides))
        app.config["TESTING"] = True
        return app
    yield make
    if not db.is_closed():
        db.close()


@pytest.fixture
def sim_app(make_sim_app, sim):
    return make_sim_app(sim)


@pytest.fixture
def twin():
    """A TWIN simulator over real HTTP; a test that asks for it gets a receiver pointed at it."""
    with Simulator(SimConfig(seed=11, **FAST_TWIN)).start() as simulator:
        yield simulator


@pytest.fixture
def settings(database_url, request):
    if "twin" in request.fixturenames:
        return settings_for(request.getfixturevalue("twin"), database_url)
    return make_settings(database_url)


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    if not db.is_closed():
        db.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def sends_client(database_url):
    """A client of an app that takes sends (TWIN credentials set; no request calls TWIN)."""
    app = create_app(make_settings(database_url, **TWIN_NEVER_CALLED))
    yield app.test_client()
    if not db.is_closed():
        db.close()


@pytest.fixture
def callback_path():
    return f"/callbacks/{CALLBACK_TOKEN}"


@pytest.fixture
def api_headers():
    return {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture
def send_headers():
    """POST /api/sends takes SEND_TOKEN, not API_TOKEN."""
    return {"Authorization": f"Bearer {SEND_TOKEN}"}


@pytest.fixture
def live_app(app):
    """The receiver app over real HTTP; `.url` is its base URL."""
    server = LiveServer(app).start()
    yield server
    server.stop()
