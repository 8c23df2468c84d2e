"""deploy/systemd units: `systemd-analyze verify` accepts them, and their hardening scores well.

verify insists that ExecStart's program exists, so the test checks copies whose
/opt/twin24-receiver/.venv/bin/ points at this virtualenv's bin/ (which has gunicorn and python);
everything else is the unit as shipped. Any warning verify prints about a unit fails the test too
(a misspelt setting is only a warning to systemd, and is then silently ignored).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import DEPLOY

UNITS = ["twin24-receiver-web.service", "twin24-receiver-worker.service"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"),
]


@pytest.fixture
def units(tmp_path) -> list[Path]:
    venv_bin = Path(sys.executable).parent
    copies = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        assert "/opt/twin24-receiver/.venv/bin/" in text
        copy = tmp_path / name
        copy.write_text(text.replace("/opt/twin24-receiver/.venv/bin/", f"{venv_bin}/"))
        copies.append(copy)
    for program in ("gunicorn", "python"):
        assert (venv_bin / program).exists(), f"{program} is not in {venv_bin}"
    return copies


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=30)


def test_systemd_analyze_verify_passes(units):
    result = run("verify", "--man=no", *map(str, units))
    if result.returncode != 0 and not any(unit.name in result.stderr for unit in units):
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if any(unit.name in line for unit in units)]
    assert complaints == []


@pytest.mark.parametrize("unit", UNITS)
def test_hardening_exposure_is_low(units, unit):
    path = next(p for p in units if p.name == unit)
    # --threshold is in tenths: fail above an exposure of 2.0 ("OK" in systemd's words is < 4).
    result = run("security", "--offline=true", "--threshold=20", "--no-pager", str(path))
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_units_restart_on_failure_and_read_the_environment_file(unit):
    text = (DEPLOY / "systemd" / unit).read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Restart"] == ["on-failure"]
    # A bad setting exits with this status (receiver/settings.py): restarting would repeat it forever.
    assert settings["RestartPreventExitStatus"] == (["3"] if unit.endswith("web.service") else ["78"])
    assert settings["EnvironmentFile"] == ["/etc/twin24-receiver/env"]
    assert settings["WorkingDirectory"] == ["/opt/twin24-receiver"]
    assert settings["User"] == ["twin24-receiver"]
    assert settings["ReadWritePaths"] == ["/opt/twin24-receiver/data"]
    assert settings["Environment"].count(
        "PROMETHEUS_MULTIPROC_DIR=/run/twin24-receiver") == 1
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert hardening in settings, hardening


SIZES = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


@pytest.mark.parametrize("unit", UNITS)
def test_units_bound_memory_and_tasks(unit):
    """A runaway process is stopped at MemoryMax, and cannot fork or spawn threads past TasksMax."""
    settings = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / unit).read_text().splitlines()
                    if "=" in line and not line.startswith(("#", "[")))
    memory, tasks = settings["MemoryMax"], settings["TasksMax"]
    assert memory[-1] in SIZES and 256 * SIZES["M"] <= int(memory[:-1]) * SIZES[memory[-1]] <= 4 * SIZES["G"]
    assert 16 <= int(tasks) <= 1024
