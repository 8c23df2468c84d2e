"""A faithful TWIN (twin24.ai) simulator: iam, notify and analyse on one local HTTP server.

    with Simulator(SimConfig(seed=1)).start() as sim:
        requests.post(sim.notify_url + "/messages", json=..., headers={"Authorization": f"Bearer {sim.static_token}"})
        sim.wait_idle(); sim.truth(); sim.calls(); sim.call_times()
"""
from __future__ import annotations

import bisect
import threading
import time

from werkzeug.serving import WSGIRequestHandler, make_server

from .app import apply_config, create_app
from .config import SimConfig
from .stats import truth as _truth
from .tokens import TokenStore
from .world import World

__all__ = ["Simulator", "SimConfig", "create_app", "most_calls_within"]


class _QuietHandler(WSGIRequestHandler):
    """Benchmarks make tens of thousands of requests: do not log each one."""

    def log_request(self, *args, **kwargs) -> None:
        pass


class Simulator:
    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config_at_start = config or SimConfig()
        self.world = World(self.config_at_start)
        self.tokens = TokenStore(self.config_at_start.seed)
        self.app = create_app(self.world, self.tokens)
        self._host, self._port = host, port
        self._server = None
        self._thread: threading.Thread | None = None

    # ---- life -------------------------------------------------------------------------------
    def start(self) -> Simulator:
        self.world.start()
        self._server = make_server(self._host, self._port, self.app, threaded=True,
                                   request_handler=_QuietHandler)
        # A short poll interval makes stop() quick, which test suites starting many simulators need.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="twin-sim-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.world.stop()

    def __enter__(self) -> Simulator:
        return self if self._server else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._server.server_port}"

    @property
    def auth_url(self) -> str:
        return self.url + "/iam/api/v1/auth"

    @property
    def notify_url(self) -> str:
        return self.url + "/notify/api/v1"

    @property
    def analyse_url(self) -> str:
        return self.url + "/analyse/api/v1"

    # ---- credentials ------------------------------------------------------------------------
    @property
    def config(self) -> SimConfig:
        return self.world.config

    @property
    def static_token(self) -> str | None:
        return self.world.config.static_token

    @property
    def login(self) -> str:
        return self.world.config.login

    @property
    def password(self) -> str:
        return self.world.config.password

    # ---- control ----------------------------------------------------------------------------
    def truth(self) -> list[dict]:
        return _truth(self.world)

    def calls(self) -> dict:
        return self.world.calls()

    def call_times(self, endpoints: tuple[str, ...] | None = None) -> list[float]:
        """Epoch seconds at which each call to TWIN's API arrived (every endpoint, or these), in order."""
        return sorted(at for at, name, _ in self.world.call_log() if endpoints is None or name in endpoints)

    def configure(self, **changes) -> SimConfig:
        apply_config(self.world, changes)
        return self.world.config

    def rewrite_result(self, session_id: str, result: dict, close: bool = False) -> None:
        self.world.rewrite_result(session_id, result, close)

    def expire_tokens(self) -> None:
        self.tokens.expire_all()

    def idle(self) -> bool:
        return self.world.idle()

    def wait_idle(self, timeout: float = 30) -> bool:
        """True once every lifecycle step is done and every callback delivered or given up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.world.idle():
                return True
            time.sleep(0.02)
        return self.world.idle()


def most_calls_within(times: list[float], seconds: float = 60.0) -> int:
    """The most of `times` (epoch seconds) that fall in any window [t, t + seconds): a sliding window."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + seconds) - k for k, t in enumerate(times)), default=0)
