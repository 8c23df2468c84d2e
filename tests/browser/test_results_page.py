"""The results page in a real headless Chromium: sign in, pick a mailing sent through the simulator,
check the funnel and the answers against the simulator's truth, filter, download, screenshot."""
from __future__ import annotations

import csv
import io
from collections import Counter

import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from receiver.models import ACTIVE_STAGES, Message
from receiver.worker import Worker

from ..support import API_TOKEN, phones, send_mailing, wait_for

MAILING = "Опрос, март"


def sign_in(browser, base_url: str, token: str = API_TOKEN) -> None:
    browser.delete_all_cookies()
    browser.get(base_url + "/results")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys(token)
    click_and_load(browser, "sign-in")


def click_and_load(browser, element_id: str) -> None:
    """Click a submit button and wait until the next page has replaced this one."""
    page = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, element_id).click()
    WebDriverWait(browser, 10).until(EC.staleness_of(page))


def number(browser, element_id: str) -> int:
    return int(browser.find_element(By.ID, element_id).text)


def bars(browser, chart_id: str) -> dict[str, int]:
    return {bar.get_attribute("data-key"): int(bar.get_attribute("data-count"))
            for bar in browser.find_elements(By.CSS_SELECTOR, f"#{chart_id} g.bar")}


def answer_bars(browser, key: str) -> dict[str, int]:
    """The bars of the answer chart of result field `key`, in the order the page draws them."""
    return {bar.get_attribute("data-key"): int(bar.get_attribute("data-count"))
            for bar in browser.find_elements(By.CSS_SELECTOR, f'figure[data-answer="{key}"] g.bar')}


def test_results_page_shows_a_mailing_from_the_simulator(twin, app, live_app, browser, screenshot):
    twin.configure(undelivered_rate=0.2, expired_rate=0.15, no_reply_rate=0.25)
    ids = send_mailing(twin, live_app.url, phones(16), callback_data=MAILING)
    send_mailing(twin, live_app.url, phones(3, start=100), callback_data="another mailing")
    assert twin.wait_idle(timeout=20)
    truth = [t for t in twin.truth() if t["id"] in ids]
    delivered = [t for t in truth if t["finalStatus"] == "DELIVERED"]
    answered = [t for t in delivered if t["result"]]
    failed = [t for t in truth if t["finalStatus"] in ("UNDELIVERED", "EXPIRED")]
    assert 0 < len(delivered) < 16 and answered, "seed 11 should give a funnel with every step"
    assert {t["finalStatus"] for t in failed} == {"UNDELIVERED", "EXPIRED"}, "seed 11 should fail both ways"

    enricher = Worker.from_app(app).enricher
    looking = Message.stage.in_(list(ACTIVE_STAGES))
    assert wait_for(lambda: Message.select().count() == 19 and not Message.select().where(looking).count(),
                    step=lambda: enricher.run_once(force=True), timeout=20), \
        Counter(m.stage for m in Message.select())

    sign_in(browser, live_app.url)
    assert browser.current_url.startswith(live_app.url + "/results")
    Select(browser.find_element(By.ID, "mailing")).select_by_value("c:" + MAILING)
    click_and_load(browser, "apply")

    assert number(browser, "count-sent") == 16
    assert number(browser, "count-delivered") == len(delivered)
    assert number(browser, "count-session_started") == len(delivered)
    assert number(browser, "count-answered") == len(answered)
    assert number(browser, "count-failed") == len(failed)
    assert bars(browser, "funnel") == {"sent": 16, "delivered": len(delivered), "session_started": len(delivered),
                                       "answered": len(answered), "failed": len(failed)}
    confirmations = Counter(t["result"]["confirmation"] for t in answered)
    assert answer_bars(browser, "confirmation") == dict(confirmations)
    # The simulator writes nps as the recipe does, a string: the chart still runs 1, 2, ... 10.
    nps = answer_bars(browser, "nps")
    assert nps == dict(Counter(t["result"]["nps"] for t in answered))
    assert list(nps) == sorted(nps, key=int)
    # Each destination's variables are nested under initialVariables: flattened to a chart of their own.
    assert sum(answer_bars(browser, "initialVariables.n").values()) == len(answered)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results-table tr.result-row")) == 16
    screenshot(browser, "mailing")

    # The status filter narrows the table; the funnel still describes the whole mailing.
    Select(browser.find_element(By.ID, "status")).select_by_value("DELIVERED")
    click_and_load(browser, "apply")
    statuses = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#results-table td.status")]
    assert statuses == ["DELIVERED"] * len(delivered)
    assert Select(browser.find_element(By.ID, "mailing")).first_selected_option.get_attribute("value") \
        == "c:" + MAILING
    assert number(browser, "count-sent") == 16
    screenshot(browser, "filtered")

    # The download link gives the same rows as CSV, with the page's cookie.
    link = browser.find_element(By.ID, "download-csv").get_attribute("href")
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    answer = requests.get(link, cookies=cookies, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert {row["message_id"] for row in rows} == {t["id"] for t in delivered}
    assert {row["callback_data"] for row in rows} == {MAILING}
    by_id = {t["id"]: t for t in answered}
    for row in rows:
        if row["message_id"] in by_id:
            assert row["result.confirmation"] == by_id[row["message_id"]]["result"]["confirmation"]


def test_the_page_wants_the_token(live_app, browser, screenshot):
    browser.delete_all_cookies()
    browser.get(live_app.url + "/results?status=DELIVERED")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys("not-the-token-at-all")
    click_and_load(browser, "sign-in")
    assert "That is not the API token." in browser.find_element(By.CSS_SELECTOR, ".error").text
    screenshot(browser, "refused")
    browser.find_element(By.ID, "token").send_keys(API_TOKEN)
    click_and_load(browser, "sign-in")
    assert browser.current_url == live_app.url + "/results?status=DELIVERED"
    assert browser.find_element(By.ID, "no-rows")
