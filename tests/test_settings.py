"""Settings: from the environment and .env, with one clear line for whatever is wrong."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from receiver.settings import Settings, SettingsError, masked_url

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_need_nothing_configured():
    settings = Settings.from_env(environ={}, env_file=None)

    assert settings.database_url == "sqlite:///data/receiver.db"
    assert settings.twin24_notify_url == "https://notify.twin24.ai/api/v1"
    assert not settings.has_twin24_credentials


def test_the_environment_wins_over_the_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("TWIN24_LOGIN=file@example.com\nTWIN24_PASSWORD=from-file\nENRICH_FIRST_CHECK=9\n")

    settings = Settings.from_env(environ={"ENRICH_FIRST_CHECK": "3"}, env_file=env_file)

    assert (settings.twin24_login, settings.enrich_first_check) == ("file@example.com", 3.0)


@pytest.mark.parametrize("name, value, message", [
    ("ENRICH_FIRST_CHECK", "soon", "ENRICH_FIRST_CHECK: expected a number, got 'soon'"),
    ("TWIN24_PAGE_SIZE", "0", "TWIN24_PAGE_SIZE: must be at least 1, got '0'"),
    ("PUBLIC_URL", "receiver.example.com", "PUBLIC_URL: expected an http(s) URL, got 'receiver.example.com'"),
    ("SQLITE_SYNCHRONOUS", "sometimes", "SQLITE_SYNCHRONOUS: must be one of OFF, NORMAL, FULL, EXTRA"),
    ("DATABASE_URL", "mysql://x/y", "DATABASE_URL: must be sqlite:///path or postgresql://..."),
    ("DATABASE_URL", "postgresqlx://h/db", "DATABASE_URL: must be sqlite:///path or postgresql://..."),
    ("DATABASE_URL", "sqlite://x.db", "DATABASE_URL: sqlite needs a file path, e.g. sqlite:///data/receiver.db"),
    ("DATABASE_URL", "sqlite:///:memory:", "DATABASE_URL: sqlite needs a file path"),
    ("DATABASE_URL", "sqlite:///", "DATABASE_URL: sqlite needs a file path"),
    ("CALLBACK_TOKEN", "short", "CALLBACK_TOKEN: must be at least 16 characters"),
    ("TWIN24_LOGIN", "me@example.com", "TWIN24_PASSWORD: required when TWIN24_LOGIN is set"),
])
def test_a_bad_setting_is_named_in_one_line(name, value, message):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(environ={name: value}, env_file=None)

    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_secrets_never_show_in_the_repr():
    settings = Settings.from_env(environ={"TWIN24_PASSWORD": "hunter2-hunter2", "TWIN24_LOGIN": "me",
                                          "API_TOKEN": "a" * 32}, env_file=None)

    assert "hunter2" not in repr(settings) and "a" * 32 not in repr(settings)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://receiver:s3cret-pw@db.example:5432/twin?sslmode=require",
     "postgresql://receiver:***@db.example:5432/twin?sslmode=require"),
    ("postgres://receiver:p%40ss:w0rd@db.example/twin", "postgres://receiver:***@db.example/twin"),
    ("postgresql://db.example/twin?user=receiver&password=s3cret-pw&sslmode=require",
     "postgresql://db.example/twin?user=receiver&password=***&sslmode=require"),
    ("postgresql://receiver@db.example/twin", "postgresql://receiver@db.example/twin"),
    ("sqlite:///data/receiver.db", "sqlite:///data/receiver.db"),
])
def test_the_database_password_is_masked_wherever_the_url_is_shown(url, shown):
    settings = Settings.from_env(environ={"DATABASE_URL": url}, env_file=None)

    assert masked_url(url) == shown
    assert f"database_url={shown!r}" in repr(settings)
    assert "s3cret" not in repr(settings) and "w0rd" not in repr(settings)


def test_init_db_prints_the_database_url_without_its_password(app):
    # The database itself is the test's; only the URL init-db shows is swapped for one with a password.
    url = "postgresql://receiver:s3cret-pw@db.example:5432/twin"
    app.config["SETTINGS"] = dataclasses.replace(app.config["SETTINGS"], database_url=url)

    with app.app_context():          # as `python -m receiver init-db` runs it
        outcome = app.test_cli_runner().invoke(args=["init-db"])

    assert outcome.exit_code == 0, outcome.output
    assert outcome.output.splitlines() == ["database ready: postgresql://receiver:***@db.example:5432/twin"]


@pytest.mark.parametrize("command", [
    [sys.executable, "-c", "import wsgi"],
    [sys.executable, "-m", "receiver", "status"],
])
@pytest.mark.parametrize("setting, message", [
    ({"ENRICH_MAX_WAIT": "-1"}, "ENRICH_MAX_WAIT: must be at least 0"),
    ({"DATABASE_URL": "sqlite://r.db"}, "DATABASE_URL: sqlite needs a file path"),
])
def test_start_up_stops_with_the_one_line(tmp_path, command, setting, message):
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": f"sqlite:///{tmp_path}/r.db", **setting}

    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert run.returncode == (3 if "wsgi" in command[-1] else 78)    # what the systemd units expect
    assert run.stderr.strip().splitlines() == [
        line for line in run.stderr.strip().splitlines() if message in line]
    assert "Traceback" not in run.stderr
