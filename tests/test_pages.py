"""The results page without a browser: who gets in, where sign-in leads, what the page and its CSV say.
(tests/browser/ drives the same page in a real Chromium.)"""
from __future__ import annotations

import base64
import csv
import io
import re

import pytest

from .support import API_TOKEN, answer, basic, seed, seed_mailing


def sign_in(client, token: str = API_TOKEN, next_: str = "/results"):
    return client.post("/login", data={"token": token, "next": next_})


@pytest.mark.parametrize("path", ["/results", "/results.csv", "/"])
def test_strangers_are_sent_to_sign_in(client, path):
    answer_ = client.get(path)
    assert answer_.status_code == 302 and answer_.location.startswith("/login?next=")


def test_sign_in_sets_a_signed_cookie_and_sign_out_drops_it(client):
    refused = sign_in(client, "wrong-token-wrong-token")
    assert refused.status_code == 401 and "That is not the API token." in refused.get_data(as_text=True)
    signed = sign_in(client, next_="/results?status=DELIVERED")
    assert signed.status_code == 302 and signed.location == "/results?status=DELIVERED"
    cookie = signed.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and API_TOKEN not in cookie
    page = client.get("/results")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "private, no-store"
    assert client.post("/logout").status_code == 302
    assert client.get("/results").status_code == 302


def test_a_forged_cookie_is_not_a_session(client):
    client.set_cookie("receiver_session", "eyJ2IjoxfQ.forged.signature")
    assert client.get("/results").status_code == 302


@pytest.mark.parametrize("target", [
    "//evil.example/x", "https://evil.example/", "results", "/\\evil.example",
    "/\t/evil.example", "/\n/evil.example", "/\r\nSet-Cookie: x=1", "/ /evil.example", "/results\x00",
    " /results", "/\x7f/evil.example",
])
def test_sign_in_never_leads_off_site(client, target):
    signed = sign_in(client, next_=target)
    assert signed.status_code == 302 and signed.location == "/results"


def test_sign_in_leads_back_to_a_page_with_its_query(client):
    assert sign_in(client, next_="/results?mailing=c:%D0%9E&status=DELIVERED").location == \
        "/results?mailing=c:%D0%9E&status=DELIVERED"


def test_http_basic_with_the_token(client):
    assert client.get("/results", headers=basic(API_TOKEN)).status_code == 200
    wrong = client.get("/results", headers=basic("not-the-token-xxxxxxx"))
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Basic")


def test_a_token_in_the_url_is_refused(client):
    assert client.get(f"/results?token={API_TOKEN}", headers=basic(API_TOKEN)).status_code == 400


def test_the_page_shows_the_mailing(client):
    seed_mailing(client, "Опрос <весна>", 4, undelivered=1,
                 answers=[{"confirmation": "Да", "nps": 9}, {"confirmation": "Отказ", "nps": 3}])
    seed(client, 2, prefix="o", callback_data="other")
    html = client.get("/results", query_string={"mailing": "c:Опрос <весна>"},
                      headers=basic(API_TOKEN)).get_data(as_text=True)
    assert '<dd id="count-sent">5</dd>' in html
    assert '<dd id="count-delivered">4</dd>' in html
    assert '<dd id="count-session_started">2</dd>' in html
    assert '<dd id="count-answered">2</dd>' in html
    assert '<dd id="count-failed">1</dd>' in html
    assert "Опрос &lt;весна&gt;" in html and "Опрос <весна>" not in html      # escaped
    assert html.count('class="result-row"') == 5
    assert 'data-key="Отказ" data-count="1"' in html
    assert "callbackData=%D0%9E%D0%BF%D1%80%D0%BE%D1%81+%3C%D0%B2%D0%B5%D1%81%D0%BD%D0%B0%3E" in html


def chart(html: str, key: str) -> dict[str, int]:
    """The bars of the answer chart of `key`: {value: count}, in the page's order."""
    figure = html.split(f'data-answer="{key}"', 1)[1].split("</figure>", 1)[0]
    return {value: int(count) for value, count in re.findall(r'data-key="([^"]*)" data-count="(\d+)"', figure)}


def test_the_page_charts_every_kind_of_answer_and_counts_failures(client):
    ids = seed(client, 20, callback_data="kinds")
    seed(client, 1, prefix="x", callback_data="kinds", status="EXPIRED", old_status="PENDING")
    seed(client, 1, prefix="u", callback_data="kinds", status="UNDELIVERED")
    answer(ids[0], {"nps": "10", "choice": ["a", "b"], "ok": True, "profile": {"city": "Тверь"}, "initialVariables": []})
    answer(ids[1], {"nps": "7", "choice": ["b"], "ok": False, "initialVariables": {"name": "Ivan"}})
    answer(ids[2], {"nps": "9", "choice": [], "ok": True})
    for n, message_id in enumerate(ids[3:18]):
        answer(message_id, {"comment": f"мнение {n:02d}"})
    html = client.get("/results", query_string={"mailing": "c:kinds"}, headers=basic(API_TOKEN)).get_data(as_text=True)

    assert '<dd id="count-sent">22</dd>' in html and '<dd id="count-failed">2</dd>' in html
    assert '<dd id="count-answered">18</dd>' in html
    assert chart(html, "nps") == {"7": 1, "9": 1, "10": 1} and list(chart(html, "nps")) == ["7", "9", "10"]
    assert chart(html, "choice") == {"b": 2, "a": 1}
    assert "(a list: each choice counted)" in html
    assert chart(html, "ok") == {"true": 2, "false": 1}
    assert chart(html, "profile.city") == {"Тверь": 1}
    assert chart(html, "initialVariables.name") == {"Ivan": 1}
    assert 'data-answer="initialVariables"' not in html and 'data-answer="profile"' not in html
    comments = chart(html, "comment")
    assert len(comments) == 13 and comments["(other)"] == 3 and "(3 other values)" in html
    assert "<th>profile.city</th>" in html and "<td>Тверь</td>" in html


def test_the_page_pages_and_filters(client):
    seed(client, 130)
    seed(client, 3, prefix="u", status="ERROR")
    first = client.get("/results", headers=basic(API_TOKEN)).get_data(as_text=True)
    assert first.count('class="result-row"') == 100 and 'id="next-page"' in first
    filtered = client.get("/results?status=ERROR&stage=&since=", headers=basic(API_TOKEN)).get_data(as_text=True)
    assert filtered.count('class="result-row"') == 3 and 'id="next-page"' not in filtered
    bad = client.get("/results?since=someday", headers=basic(API_TOKEN))
    assert bad.status_code == 400 and "since" in bad.get_data(as_text=True)


def test_a_crafted_cursor_is_a_400_page(client):
    nested = base64.urlsafe_b64encode(b"[" * 1500 + b"]" * 1500).decode()
    for cursor in (nested, "!!garbage!!"):
        answer_ = client.get("/results", query_string={"cursor": cursor}, headers=basic(API_TOKEN))
        assert answer_.status_code == 400 and "cursor: not a cursor" in answer_.get_data(as_text=True)


def test_the_download_link(client):
    seed(client, 3, callback_data="Опрос, март")
    seed(client, 1, prefix="x", callback_data="other")
    answer_ = client.get("/results.csv?mailing=c:Опрос, март", headers=basic(API_TOKEN))
    assert answer_.is_streamed and answer_.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert answer_.headers["Content-Disposition"] == (
        "attachment; filename=\"results.csv\"; "
        "filename*=UTF-8''%D0%9E%D0%BF%D1%80%D0%BE%D1%81%2C%20%D0%BC%D0%B0%D1%80%D1%82.csv")
    rows = list(csv.DictReader(io.StringIO(answer_.get_data(as_text=True), newline="")))
    assert len(rows) == 3 and {row["callback_data"] for row in rows} == {"Опрос, март"}
    plain = client.get("/results.csv?callbackData=other", headers=basic(API_TOKEN))
    assert plain.headers["Content-Disposition"] == 'attachment; filename="other.csv"'
    plain.get_data()
