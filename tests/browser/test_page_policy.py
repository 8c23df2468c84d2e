"""The Content-Security-Policy in a real Chromium: the page looks as it should under it (its own
stylesheet, inline SVG charts), and what the policy forbids (an injected inline style) is refused."""
from __future__ import annotations

import requests

from ..support import answer, seed
from .test_results_page import sign_in


def computed(browser, selector: str, prop: str) -> str:
    return browser.execute_script(
        "return getComputedStyle(document.querySelector(arguments[0])).getPropertyValue(arguments[1])",
        selector, prop)


def test_the_page_renders_under_its_policy_and_the_policy_holds(app, client, live_app, browser):
    ids = seed(client, 4, callback_data="survey")
    answer(ids[0], {"confirmation": "Да"})
    sign_in(browser, live_app.url)
    browser.get(live_app.url + "/results?mailing=c:survey")

    assert "default-src 'none'" in requests.get(live_app.url + "/login", timeout=10).headers[
        "Content-Security-Policy"]
    # The stylesheet applies (header.top is display:flex in results.css), the charts draw.
    assert computed(browser, "header.top", "display") == "flex"
    assert browser.execute_script(
        "return document.querySelector('svg rect.fill').getBoundingClientRect().width") > 0

    # An inline <style> (what an injected payload would try) is refused by the browser.
    browser.execute_script(
        "const s = document.createElement('style'); s.textContent = 'body { display: none !important }';"
        "document.head.appendChild(s);")
    assert computed(browser, "body", "display") == "block"
