"""Who may use the HTTP API: the bearer token, one-time login links, cookie sessions, Host names.

The bearer token is ``REMAP_HTTP_TOKEN`` when set, else ``HMAC-SHA256(cluster secret, label)``:
one secret to distribute (any console holding it can mint a login link), while the token, which
ends up in scripts and Prometheus configs, cannot be turned back into the cluster secret (which
would let its holder join as a node or console and run code). A presented secret is compared
in constant time, or looked up by its SHA-256: timing can reveal bits of a hash, never of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ...settings import Settings

#: the HMAC label: changing it changes every derived token
TOKEN_LABEL = b"remap http bearer token v1"
SESSION_COOKIE = "remap_session"
LOGIN_TTL = 600.0  # seconds a login link stays valid
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 256  # the oldest session goes when a new one would pass this
MAX_LOGIN_LINKS = 64


def derive_token(secret: bytes) -> str:
    """The bearer token belonging to a cluster secret (one-way: it does not reveal the secret)."""
    digest = hmac.new(secret, TOKEN_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def http_token(settings: Settings, secret: bytes) -> str:
    """``REMAP_HTTP_TOKEN`` when set, else the token derived from the cluster secret."""
    return settings.http_token or derive_token(secret)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass
class Session:
    """A browser that logged in: its cookie's hash is the key; the CSRF token guards writes."""

    csrf: str
    expires: float


@dataclass(frozen=True)
class Identity:
    """Who made a request: ``bearer`` (a program) or ``cookie`` (a browser session)."""

    kind: str
    session: Session | None = None


class HttpAuth:
    """Checks credentials; mints login links and sessions. Bounded: old entries are dropped."""

    def __init__(self, clock: Any, token: str, allowed_hosts: list[str] | None = None) -> None:
        self.clock = clock
        self._token = token.encode("utf-8")
        self._logins: OrderedDict[bytes, float] = OrderedDict()
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        names = {"localhost", socket.gethostname().lower()}
        names.update(h.strip().lower().rstrip(".") for h in allowed_hosts or [] if h.strip())
        self.allowed_names = frozenset(names)

    # ------------------------------------------------------------------ Host header

    def host_allowed(self, host_header: bytes | None) -> bool:
        """An IP address, localhost, this machine's name or a configured name (no DNS rebinding).

        A rebinding attack reaches us under the attacker's domain name; an IP literal or a
        name the operator listed cannot be such a name.
        """
        if not host_header:
            return False
        try:
            host = host_header.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return False
        if host.startswith("["):
            end = host.find("]")
            if end < 0 or (host[end + 1 :] and not _is_port(host[end + 2 :])):
                return False
            return _is_ip(host[1:end])
        name, _, port = host.partition(":")
        if port and not _is_port(port):
            return False
        return _is_ip(name) or name.rstrip(".") in self.allowed_names

    # ------------------------------------------------------------------ credentials

    def check_bearer(self, header: bytes | None) -> bool:
        if not header or not header[:7].lower() == b"bearer ":
            return False
        return hmac.compare_digest(header[7:].strip(), self._token)

    def check_cookie(self, value: bytes | None) -> Session | None:
        if not value:
            return None
        key = hashlib.sha256(value).digest()
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires < self.clock.seconds():
            del self._sessions[key]
            return None
        return session

    def identify(self, authorization: bytes | None, cookie: bytes | None) -> Identity | None:
        if self.check_bearer(authorization):
            return Identity("bearer")
        session = self.check_cookie(cookie)
        return Identity("cookie", session) if session is not None else None

    @staticmethod
    def csrf_ok(session: Session, presented: bytes | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented, session.csrf.encode("ascii"))

    # ------------------------------------------------------------------ login links

    def new_login_token(self) -> str:
        """A one-time token for a login link, valid for :data:`LOGIN_TTL` seconds."""
        token = secrets.token_urlsafe(24)
        self._logins[_digest(token)] = self.clock.seconds() + LOGIN_TTL
        while len(self._logins) > MAX_LOGIN_LINKS:
            self._logins.popitem(last=False)
        return token

    def redeem(self, token: str | None) -> tuple[str, Session] | None:
        """Spend a login token: a new session (cookie value, session) or None if not valid."""
        if not token:
            return None
        expires = self._logins.pop(_digest(token), None)
        now = self.clock.seconds()
        if expires is None or expires < now:
            return None
        cookie = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(24), expires=now + SESSION_TTL)
        self._sessions[hashlib.sha256(cookie.encode("ascii")).digest()] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return cookie, session


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5
