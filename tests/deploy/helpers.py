"""Running the real deployment pieces (gunicorn with deploy/gunicorn.conf.py, nginx) from tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from receiver.demo import free_port

from ..support import make_settings, settings_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GUNICORN_CONF = DEPLOY / "gunicorn.conf.py"


class Gunicorn:
    """`python -m gunicorn -c deploy/gunicorn.conf.py wsgi:app` as a child process, cwd = the repo root.

    The access log and the error log go to files in `workdir`, so a test can read them.
    """

    def __init__(self, database_url: str, workdir: Path, **env_overrides: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.access_log = self.workdir / "access.log"
        self.error_log = self.workdir / "error.log"
        self.metrics_dir = self.workdir / "metrics"
        self.metrics_dir.mkdir(exist_ok=True)
        env = settings_env(make_settings(database_url))
        for key in list(env):
            if key.startswith(("GUNICORN_", "PROMETHEUS_")):
                del env[key]
        env.update(
            GUNICORN_BIND=f"127.0.0.1:{self.port}", GUNICORN_WORKERS="3",
            GUNICORN_ACCESS_LOG=str(self.access_log), GUNICORN_ERROR_LOG=str(self.error_log),
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir), PYTHONUNBUFFERED="1",
        )
        env.update(env_overrides)
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> Gunicorn:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "wsgi:app"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr.log", "wb"),
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer /healthz within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in (self.error_log, self.workdir / "stderr.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL to the whole group if it hangs; the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
            raise

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
