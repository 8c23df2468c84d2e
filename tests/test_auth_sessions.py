"""Results-page sessions end on the server (sign-out, a new API_TOKEN), the cookie is Secure and
__Host- on an HTTPS site, and every answer carries nosniff and a Content-Security-Policy."""
from __future__ import annotations

import re

import pytest

from receiver import create_app

from .support import API_TOKEN, CALLBACK_TOKEN, answer, make_settings, seed

CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


def sign_in(client, token: str = API_TOKEN):
    signed = client.post("/login", data={"token": token, "next": "/results"})
    assert signed.status_code == 302 and signed.location == "/results", signed.status_code
    return signed


def session_cookie(signed) -> tuple[str, str]:
    """(name, value) of the session cookie a sign-in set."""
    name, _, rest = signed.headers["Set-Cookie"].partition("=")
    return name, rest.split(";", 1)[0]


def with_cookie(app, name: str, value: str):
    """Another browser holding a copy of the cookie."""
    client = app.test_client()
    client.set_cookie(name, value)
    return client


def test_signing_out_ends_the_session_on_the_server(app):
    browser = app.test_client()
    name, value = session_cookie(sign_in(browser))
    other = app.test_client()
    sign_in(other)                                      # someone else, signed in separately
    copy = with_cookie(app, name, value)
    assert copy.get("/results").status_code == 200      # a copied cookie works... while the session lasts

    assert browser.post("/logout").status_code == 302

    assert browser.get("/results").status_code == 302
    stolen = copy.get("/results")
    assert stolen.status_code == 302 and stolen.location.startswith("/login")
    assert other.get("/results").status_code == 200     # only that session ended


def test_a_new_api_token_ends_sessions_made_with_the_old_one(database_url):
    before = create_app(make_settings(database_url))
    name, value = session_cookie(sign_in(before.test_client()))
    after = create_app(make_settings(database_url, api_token="a-brand-new-api-token-0123456789"))

    assert with_cookie(after, name, value).get("/results").status_code == 302
    fresh = after.test_client()
    sign_in(fresh, "a-brand-new-api-token-0123456789")
    assert fresh.get("/results").status_code == 200


def test_an_https_site_gets_a_secure_host_prefixed_cookie(database_url):
    # Behind a proxy that speaks plain HTTP to us: PUBLIC_URL alone says the site is HTTPS.
    app = create_app(make_settings(database_url, public_url="https://receiver.example"))
    signed = sign_in(app.test_client())
    cookie = signed.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}

    assert cookie.startswith("__Host-receiver_session=")
    assert {"secure", "httponly", "path", "samesite"} <= attributes and "domain" not in attributes
    assert "Path=/;" in cookie + ";" and "SameSite=Lax" in cookie
    name, value = session_cookie(signed)
    assert with_cookie(app, name, value).get("/results").status_code == 200
    # The same value under the plain name is no session here.
    assert with_cookie(app, "receiver_session", value).get("/results").status_code == 302
    signed_out = with_cookie(app, name, value).post("/logout")
    assert signed_out.headers["Set-Cookie"].startswith("__Host-receiver_session=;")
    assert "Secure" in signed_out.headers["Set-Cookie"]


@pytest.mark.parametrize("base_url, secure", [("http://localhost", False), ("https://localhost", True)])
def test_an_http_site_names_its_cookie_by_how_the_request_came(app, base_url, secure):
    client = app.test_client()
    signed = client.post("/login", data={"token": API_TOKEN}, base_url=base_url)
    cookie = signed.headers["Set-Cookie"]
    assert cookie.startswith("__Host-receiver_session=" if secure else "receiver_session=")
    assert ("Secure" in cookie) is secure


def test_every_answer_says_nosniff_and_carries_the_policy(client, callback_path, api_headers):
    answers = {
        "login": client.get("/login"),
        "wrong token": client.post("/login", data={"token": "nope"}),
        "redirect": client.get("/results"),
        "stylesheet": client.get("/static/results.css"),
        "health": client.get("/healthz"),
        "api 401": client.get("/api/results"),
        "api": client.get("/api/results", headers=api_headers),
        "csv": client.get("/api/results.csv", headers=api_headers),
        "openapi": client.get("/api/openapi.json"),
        "metrics": client.get("/metrics"),
        "callback": client.post(callback_path, json={"id": "m-1", "newStatus": "PENDING"}),
        "not ours": client.post(f"/callbacks/x{CALLBACK_TOKEN}", json={}),
        "no route": client.get("/nowhere"),
        "api no route": client.get("/api/nowhere"),
    }
    try:
        for what, got in answers.items():
            assert got.headers.get("X-Content-Type-Options") == "nosniff", what
            assert got.headers.get("Content-Security-Policy") == CSP, what
    finally:
        # The CSV answer streams: closed here, its generator ends inside this test, not in the
        # middle of a later test's request (where it once popped that request's context).
        for got in answers.values():
            got.close()


def test_the_pages_need_nothing_the_policy_forbids(client):
    """No script, no inline style, nothing from another origin: the policy blocks none of the page."""
    ids = seed(client, 3, callback_data="survey")
    answer(ids[0], {"confirmation": "Да"})
    sign_in(client)
    results = client.get("/results?mailing=c:survey").get_data(as_text=True)
    assert "<svg" in results                                # the charts: inline SVG, allowed
    pages = [client.get("/login").get_data(as_text=True), results]
    for html in pages:
        assert "<script" not in html and "<style" not in html
        assert not re.search(r"\sstyle\s*=", html)
        assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
        assert not re.search(r"\son[a-z]+\s*=", html)       # no inline event handlers
