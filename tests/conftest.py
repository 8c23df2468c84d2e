"""Fixtures: real apps on throw-away databases, and a real TWIN simulator.

Every test that asks for `database_url` (directly or through `settings`, `app`, `client`) runs
twice: on a SQLite file of its own and on PostgreSQL, in a schema of its own. Where PostgreSQL
cannot be reached (a fresh laptop), the PostgreSQL runs are skipped with the reason printed.
Set TEST_POSTGRES_URL to point them elsewhere, or TEST_DATABASES=sqlite to run one backend.
"""
from __future__ import annotations

import os
import threading
import uuid

import psycopg2
import pytest
from werkzeug.serving import WSGIRequestHandler, make_server

from receiver import create_app, models
from receiver.db import bind
from receiver.settings import Settings
from receiver.simulator import SimConfig, Simulator

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
BACKENDS = [b for b in os.environ.get("TEST_DATABASES", "sqlite,postgresql").split(",") if b]
# A TWIN whose messages live and die in tenths of a second.
FAST_TWIN = dict(pending_after=(0.01, 0.03), final_after=(0.02, 0.06), result_after=(0.05, 0.15),
                 callback_retry_delay=0.05, session_close_after=2.0)
CALLBACK_TOKEN = "test-callback-token-0123456789"
API_TOKEN = "test-api-token-0123456789abcdef"
SEND_TOKEN = "test-send-token-0123456789abcdef"


def postgres_unavailable() -> str | None:
    """Why PostgreSQL can't be used here, or None when it can."""
    try:
        psycopg2.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg2.OperationalError as error:
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {str(error).strip().splitlines()[0]}"
    return None


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
    from .support import reset_for_tests  # support imports this module: not at the top

    bind(make_settings(url))
    reset_for_tests()
    models.db.close()


def make_settings(database_url: str, **overrides) -> Settings:
    """Settings as a deployment would have them, with timings short enough for tests."""
    values = dict(
        database_url=database_url, callback_token=CALLBACK_TOKEN, api_token=API_TOKEN, send_token=SEND_TOKEN,
        public_url="http://127.0.0.1:8000",
        enrich_first_check=0.0, enrich_sweep_interval=0.0, enrich_result_interval=0.0,
        enrich_batch_share=0.0, enrich_max_wait=0.0,
        enrich_poll_interval=0.05,
        enrich_backoff_start=0.05, enrich_backoff_max=0.5, enrich_window_margin=60.0,
        enrich_stale_after=3600.0,
        twin24_connect_timeout=2.0, twin24_read_timeout=5.0, twin24_max_retry_wait=1.0,
        metrics_cache_seconds=0.0,      # /metrics reads the database at every scrape (test_metrics tests the cache)
    )
    values.update(overrides)
    return Settings.from_env(environ={}, env_file=None, **values)


# The simulator of the simulator, client and sending tests: quick lifecycles, sessions never close.
SIM_QUICK = dict(pending_after=(0.01, 0.03), final_after=(0.02, 0.05), result_after=(0.05, 0.1),
                 callback_retry_delay=0.05)


@pytest.fixture
def sim_defaults() -> dict:
    """SimConfig values of `make_sim`; a test folder or module overrides this fixture to change them."""
    return {"seed": 1, **SIM_QUICK}


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


@pytest.fixture
def twin():
    """A TWIN simulator over real HTTP; a test that asks for it gets a receiver pointed at it."""
    with Simulator(SimConfig(seed=11, **FAST_TWIN)).start() as simulator:
        yield simulator


@pytest.fixture
def settings(database_url, request):
    twin_urls = {}
    if "twin" in request.fixturenames:
        simulator = request.getfixturevalue("twin")
        twin_urls = dict(twin24_token=simulator.static_token, twin24_auth_url=simulator.auth_url,
                         twin24_notify_url=simulator.notify_url, twin24_analyse_url=simulator.analyse_url)
    return make_settings(database_url, **twin_urls)


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    if not models.db.is_closed():
        models.db.close()


@pytest.fixture
def client(app):
    return app.test_client()


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


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


class LiveServer:
    """A WSGI app served over real HTTP from a background thread."""

    def __init__(self, wsgi_app):
        self.server = make_server("127.0.0.1", 0, wsgi_app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


@pytest.fixture
def live_app(app):
    """The receiver app over real HTTP; `.url` is its base URL."""
    server = LiveServer(app).start()
    yield server
    server.stop()
