"""deploy/env.example and the README's settings table name every setting, with the code's defaults; the
app reads an env file's values verbatim."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from receiver.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {f.metadata["env"]: f.default for f in dataclasses.fields(Settings)}


def test_env_example_lists_every_setting_with_its_default():
    text = (ROOT / "deploy" / "env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert set(SETTINGS) - named == set(), "settings missing from deploy/env.example"
    # The first commented-out line of a setting shows the default the code applies (a later one
    # may show an alternative, such as a PostgreSQL DATABASE_URL).
    first_shown: dict[str, str] = {}
    for name, shown in re.findall(r"^# ([A-Z][A-Z0-9_]+)=(\S+)$", text, re.MULTILINE):
        first_shown.setdefault(name, shown)
    for name, shown in first_shown.items():
        if name not in SETTINGS or SETTINGS[name] in (None, dataclasses.MISSING):
            continue
        default = SETTINGS[name]
        expected = float(default) if isinstance(default, (int, float)) else default
        actual = float(shown) if isinstance(default, (int, float)) else shown
        assert actual == expected, f"{name}: env.example says {shown}, the code's default is {default}"


def test_readme_settings_table_names_every_setting():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Settings"):readme.index("## Commands")]
    assert {name for name in SETTINGS if f"`{name}`" not in table} == set()


# --- values with `$` and backquotes ---------------------------------------------------------------------
# A TWIN password or a token may hold what a shell or an interpolating reader would change: `$$` (the
# shell's PID), `$HOME`, `${HOME}`, a backquote (command substitution). The app reads .env verbatim.
TRICKY = {
    "TWIN24_PASSWORD": "pa$$w`rd",
    "API_TOKEN": "abc$HOME${HOME}`id`-0123456789",
    "CALLBACK_TOKEN": "cb-${USER:-x}-$(id)-0123456789",
}


def test_a_dotenv_file_is_read_verbatim(tmp_path):
    quoted = {"TWIN24_TOKEN": "sq-$HOME${HOME}`id`-0123456789"}         # single quotes: also verbatim
    (tmp_path / ".env").write_text("".join(f"{name}={value}\n" for name, value in TRICKY.items())
                                   + "".join(f"{name}='{value}'\n" for name, value in quoted.items())
                                   + "TWIN24_LOGIN=someone@example.com\n")
    settings = Settings.from_env(environ={"HOME": "/home/someone", "USER": "someone"}, env_file=tmp_path / ".env")
    assert (settings.twin24_password, settings.api_token, settings.callback_token, settings.twin24_token) == (
        TRICKY["TWIN24_PASSWORD"], TRICKY["API_TOKEN"], TRICKY["CALLBACK_TOKEN"], quoted["TWIN24_TOKEN"])


def test_python_m_receiver_logs_in_to_twin_with_a_password_full_of_dollars(make_sim, tmp_path):
    """End to end: `python -m receiver check-twin` in a directory whose .env holds the password; the
    simulated TWIN accepts only the exact string."""
    password = "pa$$w`rd${HOME}$HOME"
    sim = make_sim(static_token=None, password=password)
    (tmp_path / ".env").write_text(f"""DATABASE_URL=sqlite:///{tmp_path}/receiver.db
TWIN24_LOGIN={sim.login}
TWIN24_PASSWORD={password}
TWIN24_AUTH_URL={sim.auth_url}
TWIN24_NOTIFY_URL={sim.notify_url}
TWIN24_ANALYSE_URL={sim.analyse_url}
""")
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "USER", "LANG")}
    run = subprocess.run([sys.executable, "-m", "receiver", "check-twin"], cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[0].startswith("login: POST ") and " -> 200 " in run.stdout.splitlines()[0]
    assert password not in run.stdout + run.stderr
