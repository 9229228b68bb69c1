"""Who may look: a bearer token, checked once at login, then a signed session cookie; CSRF tokens for controls.

The dashboard is told one access token (`--token-file`, `TETHER_DASHBOARD_TOKEN`). A browser posts it
to the login form and gets a cookie (HttpOnly, SameSite=Strict, Secure behind TLS) holding
`<session id>.<expiry>.<HMAC>` under a key made at start (or given, so replicas agree); scripts
may send `Authorization: Bearer <token>` instead. A control (pause, resume, promote, abort) is a
POST carrying a CSRF token bound to the session (HMAC of the session id), on top of SameSite.
Pure: the clock is passed in; comparisons are constant-time. Nothing here is ever rendered but the
CSRF token of the viewer's own session.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import secrets

COOKIE = "tether_dashboard"
DEFAULT_TTL_S = 12 * 3600


def _mac(key: bytes, purpose: str, text: str) -> str:
    digest = hmac.new(key, f"{purpose}\0{text}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclasses.dataclass(frozen=True)
class Sessions:
    token: str  # the access token a login must present
    key: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    ttl_s: int = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("the dashboard token must have at least 16 characters")

    def token_ok(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def login(self, presented: str, *, now: float) -> str | None:
        """A new session's cookie value when `presented` is the token, else None."""
        if not self.token_ok(presented):
            return None
        return self.issue(now=now)

    def issue(self, *, now: float) -> str:
        """A new session's cookie value (the caller has checked who it is for)."""
        sid = secrets.token_urlsafe(18)
        body = f"{sid}.{int(now) + self.ttl_s}"
        return f"{body}.{_mac(self.key, 'session', body)}"

    def session(self, cookie: str | None, *, now: float) -> str | None:
        """The session id a cookie value holds, None when it is forged, altered or expired."""
        if not cookie or cookie.count(".") != 2:
            return None
        sid, expires, mac = cookie.split(".")
        if not hmac.compare_digest(mac, _mac(self.key, "session", f"{sid}.{expires}")):
            return None
        if not expires.isdigit() or int(expires) < now:
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return _mac(self.key, "csrf", sid)

    def csrf_ok(self, sid: str, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented, self.csrf(sid))
