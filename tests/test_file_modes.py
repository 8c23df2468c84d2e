"""The SQLite database holds the tokens, phone numbers and results: whatever the umask, the directory
the service makes for it is 0700 and its files are 0600. (tests/deploy/test_run_script.py checks the
same of `make run`.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from receiver import create_app

from .support import make_settings, seed

ROOT = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_database_directory_and_files_are_private_whatever_the_umask(tmp_path):
    data = tmp_path / "state" / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{data}/receiver.db",
           "CALLBACK_TOKEN": "c" * 20, "API_TOKEN": "a" * 20}
    init = subprocess.run(["bash", "-c", f"umask 022 && exec {sys.executable} -m receiver init-db"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    assert mode(data) == 0o700
    assert {p.name: mode(p) for p in data.iterdir()} == {"receiver.db": 0o600, "receiver.db-writers.lock": 0o600}

    # While the service runs, SQLite's -wal and -shm files take the database file's mode.
    previous = os.umask(0o022)
    try:
        app = create_app(make_settings(f"sqlite:///{data}/receiver.db"))
        seed(app.test_client(), 1)
        assert {p.name: mode(p) for p in data.iterdir()} == {
            "receiver.db": 0o600, "receiver.db-wal": 0o600, "receiver.db-shm": 0o600,
            "receiver.db-writers.lock": 0o600}
    finally:
        os.umask(previous)


def test_an_existing_directory_keeps_the_mode_its_owner_gave_it(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)
    create_app(make_settings(f"sqlite:///{shared}/receiver.db"))
    assert mode(shared) == 0o750 and mode(shared / "receiver.db") == 0o600
