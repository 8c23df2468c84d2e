"""Formula injection: a recipient answers the bot with a spreadsheet formula; every CSV a person downloads
has it defused, and the raw form is there only when asked for (API raw=1, export --raw).

The answer arrives the real way: a mailing sent to the TWIN simulator with the live receiver as
callbackUrl, its callbacks, and the enrichment loop that stores the bot's result.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import re

import pytest

from receiver.models import Message
from receiver.simulator import SimConfig, Simulator
from receiver.worker import Worker

from .support import FAST_TWIN, phones, send_mailing, wait_for

FORMULA = '=HYPERLINK("http://x","y")'
DEFUSED = "'" + FORMULA
MAILING = "formulas"


@pytest.fixture
def twin():
    """A TWIN whose bot records the formula as every recipient's confirmation."""
    with Simulator(SimConfig(seed=5, result_confirmations=(FORMULA,), **FAST_TWIN)).start() as simulator:
        yield simulator


@pytest.fixture
def answered(twin, app, live_app):
    """The ids of a mailing of three whose results are stored, each answering FORMULA."""
    ids = send_mailing(twin, live_app.url, phones(3), callback_data=MAILING)
    assert twin.wait_idle(timeout=20)
    enricher = Worker.from_app(app).enricher
    stored = wait_for(lambda: Message.select().where(Message.result.is_null(False)).count() == 3,
                      step=lambda: enricher.run_once(force=True))
    assert stored, [(m.id, m.stage, m.result) for m in Message.select()]
    assert {json.loads(m.result)["confirmation"] for m in Message.select()} == {FORMULA}
    return ids


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline="")))


def basic_auth(app) -> dict:
    token = base64.b64encode(f"x:{app.config['API_TOKEN']}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def link(page: str, link_id: str) -> str:
    return html.unescape(re.search(rf'<a id="{link_id}" href="([^"]+)"', page).group(1))


def test_the_pages_downloads_defuse_the_formula(app, client, answered):
    auth = basic_auth(app)
    page = client.get(f"/results?mailing=c:{MAILING}", headers=auth).get_data(as_text=True)
    for link_id in ("download-csv", "download-excel"):
        text = client.get(link(page, link_id), headers=auth).get_data(as_text=True)
        found = rows(text)
        assert sorted(row["message_id"] for row in found) == sorted(answered)
        assert {row["result.confirmation"] for row in found} == {DEFUSED}
        assert FORMULA not in [cell for row in found for cell in row.values()]
    # The page offers no raw form: a person downloading from it always gets the defused file.
    assert client.get(f"/results.csv?callbackData={MAILING}&raw=1", headers=auth).status_code == 400


def test_the_api_defuses_by_default_and_gives_the_raw_form_when_asked(client, api_headers, answered):
    default = rows(client.get(f"/api/results.csv?callbackData={MAILING}", headers=api_headers).get_data(as_text=True))
    assert {row["result.confirmation"] for row in default} == {DEFUSED}
    raw = rows(client.get(f"/api/results.csv?callbackData={MAILING}&raw=1", headers=api_headers)
               .get_data(as_text=True))
    assert sorted(row["message_id"] for row in raw) == sorted(answered)
    assert {row["result.confirmation"] for row in raw} == {FORMULA}
    assert {row["result"] for row in raw} == {m.result for m in Message.select()}     # as stored


def test_the_export_defuses_by_default_and_gives_the_raw_form_with_raw(app, answered):
    runner = app.test_cli_runner()
    default = runner.invoke(args=["export", "--callback-data", MAILING], catch_exceptions=False)
    assert default.exit_code == 0 and {row["result.confirmation"] for row in rows(default.stdout)} == {DEFUSED}
    raw = runner.invoke(args=["export", "--callback-data", MAILING, "--raw"], catch_exceptions=False)
    assert raw.exit_code == 0 and {row["result.confirmation"] for row in rows(raw.stdout)} == {FORMULA}
