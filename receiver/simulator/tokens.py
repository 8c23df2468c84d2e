"""Bearer tokens like TWIN's IAM: HS256 JWTs whose payload carries `exp`, plus opaque refresh tokens.
A pair is answered as `{"token", "refreshToken"}`, TWIN's keys.

The server keeps each token's real expiry itself (by `jti`), so `expire_all()` can expire tokens that
clients already hold, and sub-second lifetimes work in tests although the JWT's `exp` is whole seconds.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time

EXPIRED = "Token is expired."      # TWIN's exact text
UNAUTHORIZED = "Unauthorized"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenStore:
    def __init__(self, seed: int) -> None:
        self._secret = f"twin24-sim-{seed}".encode()
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}          # jti -> epoch seconds
        self._refresh: dict[str, tuple[str, float, object]] = {}  # refresh token -> (subject, expiry, companyId)
        self._counter = 0

    def issue(self, subject: str, ttl: float, refresh_ttl: float, company_id=None) -> dict:
        now = time.time()
        with self._lock:
            self._counter += 1
            jti = f"{self._counter}-{secrets.token_hex(4)}"
            self._expiry[jti] = now + ttl
            refresh = secrets.token_urlsafe(24)
            self._refresh[refresh] = (subject, now + refresh_ttl, company_id)
        # exp is floored so a client that refreshes at `exp` is never late.
        payload = {"sub": subject, "iat": int(now), "exp": int(now + ttl), "jti": jti}
        if company_id is not None:
            payload["companyId"] = company_id
        return {"token": self._sign(payload), "refreshToken": refresh}

    def _sign(self, payload: dict) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        signature = hmac.new(self._secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64(signature)}"

    def decode(self, token: str) -> dict | None:
        """The payload of a token we signed (expired or not), else None."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        expected = hmac.new(self._secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _unb64(parts[2])):
                return None
            payload = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        with self._lock:
            if payload.get("jti") not in self._expiry:
                return None
        return payload

    def check(self, token: str | None) -> str | None:
        """None if the token is valid now, else TWIN's error text."""
        payload = self.decode(token) if token else None
        if payload is None:
            return UNAUTHORIZED
        with self._lock:
            if self._expiry[payload["jti"]] <= time.time():
                return EXPIRED
        return None

    def use_refresh(self, refresh: str) -> tuple[str, object] | None:
        """Consume a refresh token (they rotate); (subject, companyId) it was issued to, or None."""
        with self._lock:
            entry = self._refresh.pop(refresh, None)
        if entry is None or entry[1] <= time.time():
            return None
        return entry[0], entry[2]

    def expire_all(self) -> None:
        now = time.time()
        with self._lock:
            for jti in self._expiry:
                self._expiry[jti] = min(self._expiry[jti], now)
