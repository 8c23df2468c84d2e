"""The TWIN client against the simulator over real HTTP, plus a few answer shapes the simulator never
gives (through a scripted session)."""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from receiver.twin24 import (
    SendNotTaken,
    SendOutcomeUnknown,
    SendRejected,
    TwinAuthError,
    TwinClient,
    TwinError,
)

from ..support import Recorder, send_body, settings_for


def window():
    now = datetime.now(UTC)
    return now - timedelta(minutes=5), now + timedelta(minutes=5)


def all_ids(pages) -> list:
    return [item["id"] for page in pages for item in page]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class RecordingSession(requests.Session):
    def __init__(self):
        super().__init__()
        self.seen = []

    def request(self, method, url, **kwargs):
        self.seen.append((method, url, kwargs))
        return super().request(method, url, **kwargs)


# --------------------------------------------------------------------------- auth
def test_static_token_send_and_stats(sim, make_client, recorder):
    session = RecordingSession()
    client = make_client(settings_for(sim), session=session)
    answer = client.send(send_body(3))
    truth = sorted(sim.truth(), key=lambda m: m["position"])
    assert [item["id"] for item in answer] == [m["id"] for m in truth]
    assert [m["phone"] for m in truth] == ["79990000000", "79990000001", "79990000002"]
    assert all(item["status"] == "CREATED" for item in answer)
    start, end = window()
    pages = list(client.iter_messages(start, end, fields=("id", "providerMessageId", "status", "phone")))
    assert sorted(all_ids(pages)) == sorted(m["id"] for m in truth)
    assert all("phone" in item for item in pages[0])      # fields asked for come back as received
    assert recorder.outcomes("login") == [] and client.calls == 2
    for _method, _url, kwargs in session.seen:
        assert kwargs["timeout"] == (0.5, 1.0)
        assert kwargs["headers"]["Authorization"] == f"Bearer {sim.static_token}"
        assert kwargs["headers"]["Content-Type"] == "application/json"
        assert kwargs["allow_redirects"] is False
    params = session.seen[1][2]["params"]
    assert params["channel"] == "CHAT" and params["page"] == 0 and params["limit"] == 1000
    assert params["from"].endswith("+00:00") and "." not in params["from"]


def test_login_then_expired_token_is_refreshed(make_sim, make_client, recorder):
    sim = make_sim(static_token=None)
    client = make_client(settings_for(sim, auth="login"))
    start, end = window()
    assert list(client.iter_messages(start, end)) == []
    sim.expire_tokens()
    client.send(send_body(1))
    assert recorder.outcomes("login") == ["200"]
    assert recorder.outcomes("send") == ["401", "200"]
    assert recorder.outcomes("refresh") == ["200"]
    assert len(sim.truth()) == 1                           # the 401 took nothing; one message in all
    assert sim.calls()["send"] == {"401": 1, "200": 1}


def test_token_refreshed_ahead_of_expiry(make_sim, make_client, recorder):
    sim = make_sim(static_token=None, token_ttl=2)         # TWIN grants less than the 86400 s asked
    client = make_client(settings_for(sim, auth="login"))
    start, end = window()
    list(client.iter_messages(start, end))
    time.sleep(1.6)                                        # renewal is due 0.5 s before exp
    list(client.iter_messages(start, end))
    assert recorder.outcomes("messages_stats") == ["200", "200"]   # never a 401
    assert recorder.outcomes("refresh") == ["200"] and recorder.outcomes("login") == ["200"]


def test_failed_refresh_falls_back_to_login(make_sim, make_client, recorder):
    sim = make_sim(static_token=None)
    client = make_client(settings_for(sim, auth="login"))
    start, end = window()
    list(client.iter_messages(start, end))
    client._refresh_token = "not-a-refresh-token"
    sim.expire_tokens()
    list(client.iter_messages(start, end))
    assert recorder.outcomes("refresh") == ["401"]
    assert recorder.outcomes("login") == ["200", "200"]
    assert recorder.outcomes("messages_stats") == ["200", "401", "200"]


def test_bad_credentials_fail_fast_without_leaking(make_sim, make_client, recorder):
    sim = make_sim(static_token=None)
    settings = settings_for(sim, auth=None, twin24_login=sim.login, twin24_password="wrong-password-xyz")
    client = make_client(settings)
    started = time.monotonic()
    with pytest.raises(TwinAuthError) as caught:
        client.send(send_body(1))
    assert time.monotonic() - started < 1.0
    assert caught.value.endpoint == "login" and caught.value.status == 401
    assert "Invalid credentials" in str(caught.value)
    assert "wrong-password-xyz" not in str(caught.value)
    assert recorder.outcomes("login") == ["401"] and recorder.sleeps == []
    assert "send" not in sim.calls()


def test_rejected_static_token(sim, make_client, recorder):
    client = make_client(settings_for(sim, auth=None, twin24_token="not-the-static-token"))
    start, end = window()
    with pytest.raises(TwinAuthError) as caught:
        list(client.iter_messages(start, end))
    assert caught.value.status == 401 and recorder.outcomes("messages_stats") == ["401"]
    assert "not-the-static-token" not in str(caught.value)
    with pytest.raises(TwinAuthError):
        client.send(send_body(1))
    assert recorder.outcomes("send") == ["401"] and sim.truth() == []


def test_threads_share_one_renewal(make_sim, make_client, recorder):
    sim = make_sim(static_token=None)
    client = make_client(settings_for(sim, auth="login"))
    start, end = window()
    list(client.iter_messages(start, end))
    sim.expire_tokens()
    errors = []

    def work():
        try:
            for _ in range(3):
                list(client.iter_messages(start, end))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert recorder.outcomes("login") == ["200"] and recorder.outcomes("refresh") == ["200"]
    assert client.calls == len(recorder.calls)


# --------------------------------------------------------------------------- paging
def test_paging_across_a_silent_page_cap(make_sim, make_client, recorder):
    sim = make_sim(page_cap=50)
    client = make_client(settings_for(sim))
    for chunk in range(5):                                  # 230 messages in five sends
        client.send(send_body(46, start_phone=79990000000 + chunk * 100))
    start, end = window()
    pages = list(client.iter_messages(start, end))
    ids = all_ids(pages)
    assert len(ids) == 230 and len(set(ids)) == 230
    assert set(ids) == {m["id"] for m in sim.truth()}
    assert [len(page) for page in pages] == [50, 50, 50, 50, 30]
    assert recorder.outcomes("messages_stats") == ["200"] * 5    # stopped on count, no empty page


def test_paging_shuffled_order(make_sim, make_client):
    sim = make_sim(page_cap=40, shuffle=True)
    client = make_client(settings_for(sim))
    client.send(send_body(130))
    start, end = window()
    ids = all_ids(client.iter_messages(start, end))
    assert sorted(ids) == sorted(m["id"] for m in sim.truth())


def test_early_stop_makes_fewer_calls(make_sim, make_client, recorder):
    sim = make_sim(page_cap=50)
    client = make_client(settings_for(sim))
    answer = client.send(send_body(230))
    wanted = {answer[10]["id"], answer[20]["id"]}           # both on the first page (creation order)
    start, end = window()
    found = set()
    for page in client.iter_messages(start, end):
        found |= {item["id"] for item in page} & wanted
        if found == wanted:
            break
    assert found == wanted
    assert recorder.outcomes("messages_stats") == ["200"]


def test_sessions_paging_and_fields(make_sim, make_client, recorder):
    sim = make_sim(page_cap=25, padding_sessions=0)
    client = make_client(settings_for(sim))
    client.send(send_body(60))
    assert sim.wait_idle(10)
    start, end = window()
    pages = list(client.iter_sessions(start, end))
    sessions = [item for page in pages for item in page]
    wanted = {m["sessionId"] for m in sim.truth() if m["sessionId"]}
    assert {s["id"] for s in sessions} >= wanted and len(sessions) == len({s["id"] for s in sessions})
    assert {"id", "name", "clientId", "status", "botStatus", "startedAt",
            "dialogResultsFromBotJson"} <= set(sessions[0])
    assert len(recorder.outcomes("sessions_stats")) == len(pages)


def test_naive_datetimes_refused(sim, make_client):
    client = make_client(settings_for(sim))
    with pytest.raises(ValueError):
        next(client.iter_messages(datetime(2024, 1, 1), datetime(2024, 1, 2)))


# --------------------------------------------------------------------------- retries (statistics)
def test_rate_limit_honours_retry_after(make_sim, make_client):
    sim = make_sim(rate_limit=2)
    rec = Recorder(real_sleep=True)
    client = make_client(settings_for(sim), on_call=rec.on_call, sleep=rec.sleep)
    start, end = window()
    for _ in range(3):
        assert list(client.iter_messages(start, end)) == []
    assert rec.outcomes("messages_stats") == ["200", "200", "429", "200"]
    assert rec.sleeps == [1.0]                              # the simulator's Retry-After: 1


def test_a_retry_after_beyond_the_cap_ends_the_call_and_says_when(make_sim, make_client):
    # Calling again before TWIN's Retry-After would not honour it; waiting longer than
    # TWIN24_MAX_RETRY_WAIT inside one call would stall the worker: the caller reschedules instead.
    sim = make_sim(rate_limit=1)
    rec = Recorder(real_sleep=True)
    client = make_client(settings_for(sim, twin24_max_retry_wait=0.3, twin24_retries=10),
                         on_call=rec.on_call, sleep=rec.sleep)
    start, end = window()
    list(client.iter_messages(start, end))
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(start, end))
    assert (caught.value.status, caught.value.retry_after) == (429, 1.0)
    assert rec.outcomes("messages_stats") == ["200", "429"] and rec.sleeps == []


def test_server_errors_retried_until_success(make_sim, make_client, recorder):
    sim = make_sim(error_rate=0.5)
    client = make_client(settings_for(sim, twin24_retries=20))
    start, end = window()
    for _ in range(10):
        assert list(client.iter_messages(start, end)) == []
    outcomes = recorder.outcomes("messages_stats")
    assert outcomes.count("200") == 10
    assert {o for o in outcomes if o != "200"} and {o for o in outcomes if o != "200"} <= {"500", "502", "503"}
    assert len(recorder.sleeps) == len(outcomes) - 10


def test_retries_exhausted(make_sim, make_client, recorder):
    sim = make_sim(error_rate=1.0)
    client = make_client(settings_for(sim, twin24_retries=2))
    start, end = window()
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(start, end))
    assert caught.value.endpoint == "messages_stats" and caught.value.status in (500, 502, 503)
    assert "gave up after 3 attempts" in caught.value.detail
    assert len(recorder.outcomes("messages_stats")) == 3 and len(recorder.sleeps) == 2
    # exponential backoff with jitter: each wait within [step/2, step], step doubling
    for n, wait in enumerate(recorder.sleeps):
        assert 0.01 * 2 ** n / 2 <= wait <= 0.01 * 2 ** n


def test_stats_connection_refused_then_error(sim, make_client, recorder, closed_port):
    client = make_client(settings_for(sim, twin24_analyse_url=f"http://127.0.0.1:{closed_port}",
                                      twin24_retries=2))
    start, end = window()
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(start, end))
    assert caught.value.status is None and "could not connect" in caught.value.detail
    assert recorder.outcomes("messages_stats") == ["connection_error"] * 3


def test_stats_read_timeout_retried(make_sim, make_client, recorder):
    sim = make_sim(slow_rate=1.0, slow_seconds=1.0)
    client = make_client(settings_for(sim, twin24_read_timeout=0.3, twin24_retries=1))
    start, end = window()
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(start, end))
    assert recorder.outcomes("messages_stats") == ["timeout", "timeout"]
    assert "read timeout" in caught.value.detail


# --------------------------------------------------------------------------- sends
def test_send_503_is_outcome_unknown_and_not_retried(make_sim, make_client, recorder):
    sim = make_sim(fail_sends=[0])
    client = make_client(settings_for(sim))
    with pytest.raises(SendOutcomeUnknown) as caught:
        client.send(send_body(2))
    assert caught.value.status == 503
    assert sim.calls()["send"] == {"503": 1} and recorder.sleeps == []
    assert client.send(send_body(2))                       # the next send goes through


def test_send_random_5xx_not_retried(make_sim, make_client, recorder):
    sim = make_sim(error_rate=1.0)
    client = make_client(settings_for(sim, twin24_retries=5))
    with pytest.raises(SendOutcomeUnknown):
        client.send(send_body(1))
    assert len(recorder.outcomes("send")) == 1 and sum(sim.calls()["send"].values()) == 1


def test_send_connection_refused_retried_then_not_taken(sim, make_client, recorder, closed_port):
    client = make_client(settings_for(sim, twin24_notify_url=f"http://127.0.0.1:{closed_port}",
                                      twin24_retries=2))
    with pytest.raises(SendNotTaken) as caught:
        client.send(send_body(1))
    assert recorder.outcomes("send") == ["connection_error"] * 3 and len(recorder.sleeps) == 2
    assert "Connection refused" in caught.value.detail and "gave up after 3 attempts" in caught.value.detail


def test_send_unresolvable_host_is_not_taken(sim, make_client, recorder):
    client = make_client(settings_for(sim, twin24_notify_url="http://no-such-host.invalid",
                                      twin24_retries=1))
    with pytest.raises(SendNotTaken):
        client.send(send_body(1))
    assert recorder.outcomes("send") == ["connection_error"] * 2


def test_send_answer_lost_after_accept(make_sim, make_client, recorder):
    sim = make_sim(drop_after_accept_sends=[0], drop_sleep=1.5)
    client = make_client(settings_for(sim, twin24_read_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(SendOutcomeUnknown) as caught:
        client.send(send_body(2))
    assert 0.4 < time.monotonic() - started < 1.4
    assert "read timeout" in caught.value.detail
    assert recorder.outcomes("send") == ["timeout"] and recorder.sleeps == []
    assert len(sim.truth()) == 2                           # TWIN did take them
    assert wait_for(lambda: sim.calls().get("send") == {"200": 1})


def test_send_connection_cut_after_accept(make_sim, make_client, recorder):
    sim = make_sim(drop_after_accept_sends=[0], drop_sleep=0)
    client = make_client(settings_for(sim))
    with pytest.raises(SendOutcomeUnknown):
        client.send(send_body(1))
    assert recorder.outcomes("send") == ["connection_error"]
    assert len(sim.truth()) == 1


def test_send_validation_error_is_rejected(sim, make_client, recorder):
    client = make_client(settings_for(sim))
    body = send_body(1)
    body["messages"][0]["destinations"][0]["phone"] = "12"
    with pytest.raises(SendRejected) as caught:
        client.send(body)
    assert caught.value.status == 422
    assert "Validation failed" in caught.value.detail and "destinations[0].phone" in caught.value.detail
    assert "messages[0].destinations[0].phone" in caught.value.body["details"]
    assert recorder.outcomes("send") == ["422"] and sim.truth() == []


def test_send_rate_limited_is_retried(make_sim, make_client):
    sim = make_sim(rate_limit=1)
    rec = Recorder(real_sleep=True)
    client = make_client(settings_for(sim), on_call=rec.on_call, sleep=rec.sleep)
    first = client.send(send_body(1))
    second = client.send(send_body(1, start_phone=79991111111))
    assert rec.outcomes("send") == ["200", "429", "200"] and rec.sleeps == [1.0]
    assert {m["id"] for m in sim.truth()} == {first[0]["id"], second[0]["id"]}


def test_send_rate_limit_exhausted_is_not_taken(make_sim, make_client, recorder):
    sim = make_sim(rate_limit=1)
    client = make_client(settings_for(sim, twin24_retries=2))  # fake sleep: still inside the window
    client.send(send_body(1))
    with pytest.raises(SendNotTaken) as caught:
        client.send(send_body(1))
    assert caught.value.status == 429 and recorder.outcomes("send") == ["200", "429", "429", "429"]
    assert len(sim.truth()) == 1


def test_send_without_a_token_is_not_taken(sim, make_client, recorder, closed_port):
    client = make_client(settings_for(sim, auth="login", twin24_auth_url=f"http://127.0.0.1:{closed_port}",
                                      twin24_retries=1))
    with pytest.raises(SendNotTaken) as caught:
        client.send(send_body(1))
    assert recorder.outcomes("login") == ["connection_error"] * 2 and "send" not in dict(recorder.calls)
    assert sim.password not in str(caught.value)


# --------------------------------------------------------------------------- secrets
def test_refresh_token_never_logged_or_raised(make_sim, make_client, recorder, closed_port, caplog):
    caplog.set_level(logging.DEBUG)
    sim = make_sim(static_token=None)
    client = make_client(settings_for(sim, auth="login"))
    start, end = window()
    list(client.iter_messages(start, end))
    refresh_tokens = [client._refresh_token]
    sim.expire_tokens()                                    # a refresh, logged by urllib3 at DEBUG
    list(client.iter_messages(start, end))
    refresh_tokens.append(client._refresh_token)
    assert "POST /iam/api/v1/auth/refresh" in caplog.text   # urllib3's line; the token is in the body
    sim.stop()                                             # refresh and login now fail to connect
    client._renew_at = 0.0
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(start, end))
    text = str(caught.value) + repr(caught.value.__cause__) + repr(caught.value.__context__)
    for secret in refresh_tokens + [sim.password]:
        assert secret and secret not in text and secret not in caplog.text
    assert recorder.outcomes("refresh") == ["200", "connection_error"]


# --------------------------------------------------------------------------- scripted answers
class ScriptedSession(requests.Session):
    """Answers from a function (method, url, params, body) -> (status, body, headers)."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler
        self.requests = []

    def request(self, method, url, **kwargs):
        params, sent = dict(kwargs.get("params") or {}), kwargs.get("json")
        self.requests.append((method, url, params, sent, dict(kwargs.get("headers") or {})))
        status, body, extra = self.handler(method, url, params, sent)
        resp = requests.Response()
        resp.status_code = status
        resp._content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp.headers.update(extra or {})
        resp.url = url
        return resp


def scripted_settings(**overrides):
    from receiver.settings import Settings
    values = dict(twin24_token="static-token-1234", twin24_auth_url="http://twin.test/iam",
                  twin24_notify_url="http://twin.test/notify", twin24_analyse_url="http://twin.test/analyse",
                  twin24_retries=3, twin24_max_retry_wait=30.0, twin24_page_size=1000)
    values.update(overrides)
    return Settings.from_env(environ={}, env_file=None, **values)


def pages_handler(pages, count=None):
    def handler(method, url, params, body):
        page = params["page"]
        items = [{"id": f"m{page}-{i}", "extra": {"kept": True}} for i in range(pages[page])] \
            if page < len(pages) else []
        answer = {"items": items}
        if count is not None:
            answer["count"] = count
        return 200, answer, {}
    return handler


@pytest.mark.parametrize("pages, calls", [
    ([100, 100, 37], 3),          # no count: a page shorter than the earlier ones is the last
    ([100, 100, 100], 4),         # full pages: the empty one ends it
    ([7], 2),                     # a short first page proves nothing (the cap is unknown)
])
def test_paging_without_count(pages, calls):
    session = ScriptedSession(pages_handler(pages))
    client = TwinClient(scripted_settings(), session=session)
    got = list(client.iter_messages(*window()))
    assert [len(page) for page in got] == pages
    assert got[0][0]["extra"] == {"kept": True}
    assert client.calls == calls


def test_paging_short_capped_pages_follow_count():
    session = ScriptedSession(pages_handler([100, 100, 37], count=237))
    client = TwinClient(scripted_settings(), session=session)
    assert sum(len(p) for p in client.iter_messages(*window())) == 237 and client.calls == 3


def test_paging_stops_when_the_server_ignores_page():
    session = ScriptedSession(lambda *a: (200, {"count": 5000, "items": [{"id": i} for i in range(100)]}, {}))
    client = TwinClient(scripted_settings(), session=session)
    pages = list(client.iter_sessions(*window()))
    assert len(pages) == 1 and client.calls == 2
    params = session.requests[0][2]
    assert params["withoutCount"] == "false" and params["fields"].startswith("id,name,clientId")


@pytest.mark.parametrize("answer", [b"<html>gateway</html>", {"data": []}, [1, 2]])
def test_unreadable_statistics_answer(answer):
    client = TwinClient(scripted_settings(), session=ScriptedSession(lambda *a: (200, answer, {})))
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(*window()))
    assert client.calls == 1 and ("not JSON" in caught.value.detail or "items" in caught.value.detail)


def test_retry_after_http_date_and_beyond_the_cap():
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    script = iter([(503, {"error": "busy"}, {"Retry-After": when}),
                   (429, {"error": "slow down"}, {"Retry-After": "120"}),
                   (200, {"count": 0, "items": []}, {})])
    rec = Recorder()
    client = TwinClient(scripted_settings(), session=ScriptedSession(lambda *a: next(script)),
                        sleep=rec.sleep, on_call=rec.on_call)
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(*window()))
    assert len(rec.sleeps) == 1 and 17 <= rec.sleeps[0] <= 20, "a date within the cap is waited for"
    assert caught.value.retry_after == 120.0 and "wait 120 s" in str(caught.value)
    assert rec.outcomes("messages_stats") == ["503", "429"]


def test_a_token_that_expires_again_later_in_a_call_is_renewed_again():
    tokens = iter(["t1", "t2", "t3"])
    script = iter([401, 503, 401, 200])

    def handler(method, url, params, body):
        if url.endswith("/login"):
            return 200, {"authToken": next(tokens)}, {}
        status = next(script)
        return status, ({"count": 0, "items": []} if status == 200 else {"error": "x"}), {}
    rec = Recorder()
    client = TwinClient(scripted_settings(twin24_token=None, twin24_login="a@b.c", twin24_password="pw"),
                        session=ScriptedSession(handler), sleep=rec.sleep, on_call=rec.on_call)
    assert list(client.iter_messages(*window())) == []
    assert rec.outcomes("messages_stats") == ["401", "503", "401", "200"]


def test_second_401_with_fresh_token_is_auth_error():
    def handler(method, url, params, body):
        if url.endswith("/login"):
            return 200, {"token": "opaque-token", "refreshToken": "r1"}, {}
        if url.endswith("/refresh"):
            return 200, {"token": "opaque-token-2", "refreshToken": "r2"}, {}
        return 401, {"error": "Token is expired."}, {}
    rec = Recorder()
    session = ScriptedSession(handler)
    client = TwinClient(scripted_settings(twin24_token=None, twin24_login="a@b.c", twin24_password="pw-secret"),
                        session=session, on_call=rec.on_call, sleep=rec.sleep)
    with pytest.raises(TwinAuthError):
        client.send(send_body(1))
    assert rec.outcomes("send") == ["401", "401"]
    assert [r[4].get("Authorization") for r in session.requests if r[1].endswith("/messages")] == \
        ["Bearer opaque-token", "Bearer opaque-token-2"]
    login = session.requests[0]
    assert login[3] == {"email": "a@b.c", "password": "pw-secret", "ttl": 86400}
    refresh = session.requests[2]
    assert refresh[0] == "POST" and refresh[2] == {} and refresh[3] == {"refreshToken": "r1", "ttl": 86400}
    assert refresh[4]["Authorization"] == "Bearer opaque-token"


@pytest.mark.parametrize("answer", [b"not json", [{"id": "a"}], {"id": "a"}])
def test_unreadable_send_answer_is_outcome_unknown(answer):
    client = TwinClient(scripted_settings(), session=ScriptedSession(lambda *a: (200, answer, {})))
    with pytest.raises(SendOutcomeUnknown):
        client.send(send_body(2))
    assert client.calls == 1


def test_on_call_failure_does_not_break_calls():
    def boom(endpoint, outcome):
        raise RuntimeError("metrics down")
    client = TwinClient(scripted_settings(), on_call=boom,
                        session=ScriptedSession(lambda *a: (200, [{"id": "a"}], {})))
    assert client.send(send_body(1)) == [{"id": "a"}]


def test_jwt_expiry_read_from_payload():
    import base64
    claims = base64.urlsafe_b64encode(json.dumps({"iat": 1000, "exp": 1600}).encode()).decode().rstrip("=")
    token = f"xx.{claims}.sig"

    def handler(method, url, params, body):
        if url.endswith("/login"):
            return 200, {"token": token, "refreshToken": "r"}, {}
        return 200, {"count": 0, "items": []}, {}
    client = TwinClient(scripted_settings(twin24_token=None, twin24_login="a@b.c", twin24_password="pw"),
                        session=ScriptedSession(handler))
    before = time.monotonic()
    list(client.iter_messages(*window()))
    after = time.monotonic()
    assert before + 540 <= client._renew_at <= after + 540      # 60 s ahead of a 600 s life


def test_a_send_gets_one_fresh_token_per_call_even_after_other_answers():
    tokens = iter(["t1", "t2", "t3"])
    script = iter([401, 429, 401])

    def handler(method, url, params, body):
        if url.endswith("/login"):
            return 200, {"token": next(tokens)}, {}
        return next(script), {"error": "x"}, {}
    rec = Recorder()
    client = TwinClient(scripted_settings(twin24_token=None, twin24_login="a@b.c", twin24_password="pw"),
                        session=ScriptedSession(handler), sleep=rec.sleep, on_call=rec.on_call)
    with pytest.raises(TwinAuthError, match="refused even with a fresh token"):
        client.send(send_body(1))
    assert rec.outcomes("send") == ["401", "429", "401"] and rec.outcomes("login") == ["200", "200"]


def test_a_send_waits_out_a_long_retry_after_capped_and_its_give_up_keeps_the_body_only():
    rec = Recorder()
    client = TwinClient(scripted_settings(twin24_retries=1, twin24_max_retry_wait=2.0),
                        session=ScriptedSession(lambda *a: (429, {"error": "slow down"}, {"Retry-After": "120"})),
                        sleep=rec.sleep, on_call=rec.on_call)
    with pytest.raises(SendNotTaken) as caught:
        client.send(send_body(1))
    assert rec.sleeps == [2.0] and rec.outcomes("send") == ["429", "429"]
    assert str(caught.value) == "TWIN send: 429: rate limited: HTTP 429: slow down (gave up after 2 attempts)"
    assert (caught.value.body, caught.value.retry_after) == ({"error": "slow down"}, None)


def test_a_login_given_up_on_5xx_carries_neither_body_nor_retry_after():
    def handler(method, url, params, body):
        return 503, {"error": "down"}, {"Retry-After": "120"}
    rec = Recorder()
    client = TwinClient(scripted_settings(twin24_token=None, twin24_login="a@b.c", twin24_password="pw",
                                          twin24_retries=2, twin24_max_retry_wait=2.0),
                        session=ScriptedSession(handler), sleep=rec.sleep, on_call=rec.on_call)
    with pytest.raises(TwinError) as caught:
        list(client.iter_messages(*window()))
    assert type(caught.value) is TwinError and caught.value.endpoint == "login"
    assert str(caught.value) == "TWIN login: 503: HTTP 503: down (gave up after 3 attempts)"
    assert (caught.value.body, caught.value.retry_after) == (None, None)
    assert rec.sleeps == [2.0, 2.0] and rec.outcomes("login") == ["503"] * 3
