"""deploy/env.example and the README's settings table name every setting, with the code's defaults."""
from __future__ import annotations

import dataclasses
import re
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
