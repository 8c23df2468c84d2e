"""deploy/nginx/twin24-receiver.conf: `nginx -t` passes, and a callback through nginx reaches the app.

The site is rendered with test paths and ports (a self-signed certificate, logs in a temp dir) into
a throw-away nginx.conf, run with `nginx -p <tmp> -c ...` in the foreground, in front of gunicorn
started with deploy/gunicorn.conf.py.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import urllib3

from receiver import models
from receiver.db import bind, db

from ..support import CALLBACK_TOKEN, make_settings
from .helpers import DEPLOY, Gunicorn, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.access(p, os.X_OK)), None)
SITE = DEPLOY / "nginx" / "twin24-receiver.conf"
JSON = {"Content-Type": "application/json"}
SEND_TOKEN = "test-send-token-for-nginx-0123456789"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


def render_site(tmp: Path, http_port: int, https_port: int, upstream_port: int) -> str:
    site = SITE.read_text()
    replacements = {
        "listen [::]:80;": "",
        "listen [::]:443 ssl;": "",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
        "/etc/letsencrypt/live/receiver.example.com/fullchain.pem": str(tmp / "cert.pem"),
        "/etc/letsencrypt/live/receiver.example.com/privkey.pem": str(tmp / "key.pem"),
        "/var/log/nginx/twin24-receiver.access.log": str(tmp / "access.log"),
        "/var/log/nginx/twin24-receiver.error.log": str(tmp / "site-error.log"),
        "/var/www/html": str(tmp / "www"),
    }
    for old, new in replacements.items():
        assert old in site, f"the site file no longer has {old!r}: update this test"
        site = site.replace(old, new)
    return site


def nginx_conf(tmp: Path, site: Path) -> Path:
    temp_paths = "\n".join(f"    {name}_temp_path {tmp / name};" for name in
                           ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""   # workers read the 0700 pytest temp dir
    conf = tmp / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} info;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp_paths}
    include {site};
}}
""")
    return conf


def make_certificate(tmp: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True, capture_output=True, timeout=30)


@pytest.fixture
def nginx_site(tmp_path):
    """(nginx.conf path, http port, https port, upstream port), rendered and certified."""
    make_certificate(tmp_path)
    (tmp_path / "www").mkdir()
    http_port, https_port, upstream_port = free_port(), free_port(), free_port()
    site = tmp_path / "site.conf"
    site.write_text(render_site(tmp_path, http_port, https_port, upstream_port))
    return nginx_conf(tmp_path, site), http_port, https_port, upstream_port


def nginx(conf: Path, *args: str, **kwargs):
    prefix = conf.parent
    return [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), *args], kwargs


def test_nginx_t_accepts_the_site(nginx_site):
    conf = nginx_site[0]
    command, _ = nginx(conf, "-t")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


def https_connection(port: int, address: str = "127.0.0.1") -> http.client.HTTPSConnection:
    """A kept-alive HTTPS connection to the site from a chosen local address (so that nginx's view of
    the client differs from gunicorn's, and limits per address can be told apart)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context, source_address=(address, 0))


def ask(connection: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> http.client.HTTPResponse:
    """One request on the connection; the answer, its body read (`.data`)."""
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    answer.data = answer.read()
    return answer


def post_from(address: str, port: int, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    """POST over HTTPS from a chosen local address."""
    connection = https_connection(port, address)
    try:
        answer = ask(connection, "POST", path, body, headers)
        return answer.status, answer.data
    finally:
        connection.close()


def concurrently(port: int, requests: list[tuple[str, str, bytes | None]], clients: int = 8) -> list:
    """Each (method, path, body) sent over `clients` kept-alive connections from one address at once,
    as TWIN sends a mailing's callbacks; the answers."""
    def run(share):
        connection = https_connection(port)
        try:
            return [ask(connection, method, path, body, JSON) for method, path, body in share]
        finally:
            connection.close()

    with ThreadPoolExecutor(clients) as pool:
        return [answer for answers in pool.map(run, [requests[i::clients] for i in range(clients)])
                for answer in answers]


@contextmanager
def site_in_front_of_gunicorn(nginx_site, tmp_path: Path) -> Iterator[Gunicorn]:
    """nginx with the site, running in front of gunicorn (SQLite in tmp_path), until the block ends."""
    conf, _, https_port, upstream_port = nginx_site
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    gunicorn = Gunicorn(f"sqlite:///{tmp_path}/receiver.db", app_dir, GUNICORN_BIND=f"127.0.0.1:{upstream_port}",
                        GUNICORN_WORKERS="2", TRUSTED_PROXIES="1", SEND_TOKEN=SEND_TOKEN)
    gunicorn.url = f"http://127.0.0.1:{upstream_port}"
    command, _ = nginx(conf, "-g", "daemon off;")
    with gunicorn:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for_port(https_port, server)
            yield gunicorn
        finally:
            server.terminate()
            server.wait(timeout=10)


def test_a_callback_through_nginx_reaches_the_app_with_the_clients_address(nginx_site, tmp_path):
    _, http_port, https_port, _ = nginx_site
    with site_in_front_of_gunicorn(nginx_site, tmp_path) as gunicorn:
        path = f"/callbacks/{CALLBACK_TOKEN}"
        body = json.dumps({"id": "via-nginx-1", "newStatus": "DELIVERED", "callbackData": "nginx"}).encode()
        # The client (127.0.0.2) says it is someone else: that header must not be believed.
        status, answer = post_from("127.0.0.2", https_port, path, body, {
            "Content-Type": "application/json", "X-Forwarded-For": "203.0.113.9"})
        assert status == 200, answer
        assert json.loads(answer) == {"stored": True, "duplicate": False}

        # Over the size limit: nginx answers 413 itself.
        status, _ = post_from("127.0.0.2", https_port, path, b'{"id":"' + b"x" * 70_000 + b'"}',
                              {"Content-Type": "application/json"})
        assert status == 413

        # Plain HTTP is redirected to HTTPS.
        answer = requests.get(f"http://127.0.0.1:{http_port}/healthz", allow_redirects=False, timeout=10)
        assert answer.status_code == 301
        assert answer.headers["Location"].startswith("https://")
        with _quiet_insecure():
            answer = requests.get(f"https://127.0.0.1:{https_port}/healthz", verify=False, timeout=10)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        assert "max-age" in answer.headers["Strict-Transport-Security"]
        # A token in a query string is refused by the app, and masked in nginx's log.
        with _quiet_insecure():
            answer = requests.get(f"https://127.0.0.1:{https_port}/api/messages?id=1&api_token=QUERYSECRET123",
                                  verify=False, timeout=10)
        assert answer.status_code == 400

    bind(make_settings(f"sqlite:///{tmp_path}/receiver.db"))
    try:
        with db.connection_context():
            event = models.Event.get(models.Event.message_id == "via-nginx-1")
    finally:
        db.close()
    # gunicorn saw nginx at 127.0.0.1; the app stored the address nginx saw.
    assert event.remote_addr == "127.0.0.2"

    access = (tmp_path / "access.log").read_text()
    assert '"POST /callbacks/*** HTTP/1.1" 200' in access
    assert '"POST /callbacks/*** HTTP/1.1" 413' in access
    assert CALLBACK_TOKEN not in access
    assert "QUERYSECRET123" not in access and "api_token=***" in access
    assert CALLBACK_TOKEN not in gunicorn.access_log.read_text()


def test_a_big_mailing_reaches_the_app_and_a_big_callback_does_not(nginx_site, tmp_path):
    https_port = nginx_site[2]
    mailing = {"chat": {"chatId": "chan-1", "botId": "bot-1", "text": "Hello {{name}}", "chatSessionName": "big"},
               "callbackData": "big-mailing",
               "destinations": [{"phone": f"7999{n:07d}", "externalId": f"crm-{n}", "variables": {"name": f"Name {n}"}}
                                for n in range(2000)]}
    body = json.dumps(mailing).encode()
    assert len(body) > 64 * 1024
    with site_in_front_of_gunicorn(nginx_site, tmp_path):
        connection = https_connection(https_port)
        try:
            answer = ask(connection, "POST", "/api/sends", body, {**JSON, "Authorization": f"Bearer {SEND_TOKEN}"})
            # The app answered (not nginx's HTML 413): it queued the mailing, or says TWIN is not set up.
            assert answer.getheader("Content-Type") == "application/json", answer.data[:300]
            assert answer.status in (202, 503), answer.data[:300]
            if answer.status == 503:
                assert json.loads(answer.data)["error"] == "not_configured"

            # Past the app's own limit (32 MiB), nginx refuses on the Content-Length alone.
            connection.putrequest("POST", "/api/sends")
            for name, value in {**JSON, "Content-Length": str(32 * 1024 * 1024 + 1)}.items():
                connection.putheader(name, value)
            connection.endheaders()
            answer = connection.getresponse()
            assert answer.status == 413 and "text/html" in answer.getheader("Content-Type")
            answer.read()
        finally:
            connection.close()

        # A callback keeps the small limit: nginx's own 413.
        connection = https_connection(https_port)
        try:
            answer = ask(connection, "POST", f"/callbacks/{CALLBACK_TOKEN}",
                         json.dumps({"id": "big", "newStatus": "DELIVERED", "callbackData": "x" * 70_000}).encode(),
                         JSON)
            assert answer.status == 413 and b"nginx" in answer.data
        finally:
            connection.close()


def callback(message_id: str) -> tuple[str, str, bytes]:
    return ("POST", f"/callbacks/{CALLBACK_TOKEN}",
            json.dumps({"id": message_id, "newStatus": "DELIVERED", "callbackData": "burst"}).encode())


def test_a_burst_of_callbacks_like_twins_all_pass(nginx_site, tmp_path):
    """TWIN posts a mailing's callbacks from one address, many at once: none may be refused."""
    # This client is slower than TWIN may be; the arithmetic covers the rest: a 10,000-message
    # mailing's ~30,000 callbacks pass even if they all come within 70 s.
    site = SITE.read_text()
    rate = int(re.search(r"zone=twin24_receiver_callbacks:\w+ +rate=(\d+)r/s;", site).group(1))
    burst = int(re.search(r"zone=twin24_receiver_callbacks burst=(\d+) nodelay;", site).group(1))
    assert rate * 70 + burst >= 30_000
    with site_in_front_of_gunicorn(nginx_site, tmp_path):
        answers = concurrently(nginx_site[2], [callback(f"burst-{n}") for n in range(2000)], clients=16)
    assert Counter(answer.status for answer in answers) == {200: 2000}
    bind(make_settings(f"sqlite:///{tmp_path}/receiver.db"))
    try:
        with db.connection_context():
            assert models.Event.select().where(models.Event.callback_data == "burst").count() == 2000
    finally:
        db.close()


def test_hammering_the_sign_in_and_the_api_gets_429(nginx_site, tmp_path):
    https_port = nginx_site[2]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with site_in_front_of_gunicorn(nginx_site, tmp_path):
        connection = https_connection(https_port, "127.0.0.2")
        try:
            tries = [ask(connection, "POST", "/login", b"token=a-guess-at-the-api-token", form) for _ in range(10)]
            # The first six are the app's answers (a wrong token); then nginx refuses, in JSON.
            assert [a.status != 429 for a in tries] == [True] * 6 + [False] * 4, [a.status for a in tries]
            refused = tries[-1]
            assert refused.getheader("Content-Type") == "application/json"
            assert json.loads(refused.data)["error"] == "rate_limited"
            assert refused.getheader("Retry-After") == "10"
            # Showing the form is not counted; another address has its own allowance.
            assert ask(connection, "GET", "/login").status == 200
        finally:
            connection.close()
        assert post_from("127.0.0.3", https_port, "/login", b"token=another-guess", form)[0] != 429

        # The API allows bursts of 200, then about 20 a second.
        answers = concurrently(https_port, [("GET", "/api/messages?id=1", None)] * 500)
        statuses = Counter(answer.status for answer in answers)
        assert statuses[401] >= 200 and statuses[429] > 0, statuses
        assert set(statuses) == {401, 429}
        # Callbacks are counted apart from the API.
        assert post_from("127.0.0.1", https_port, *callback("after-api")[1:], JSON)[0] == 200


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {process.stderr.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not listen in time")


class _quiet_insecure:
    def __enter__(self):
        import warnings
        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
