"""``remap dashboard``: ask the server's HTTP API for a one-time login link, with the bearer token.

The console computes the token itself (``REMAP_HTTP_TOKEN``, or derived from the cluster secret
it already holds), so no new secret has to reach the console's machine.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request

from ..auth import client_secret
from ..errors import AuthError, ConfigError, ServerUnreachable
from ..net import tls_enabled
from ..server.http.security import http_token
from ..settings import Settings, parse_address


def http_base(settings: Settings, http_port: int | None = None) -> str:
    """``scheme://host:port`` of the server's HTTP API, from REMAP_SERVER and REMAP_HTTP_PORT."""
    if not settings.server:
        raise ConfigError(
            "dashboard needs a server (--server or REMAP_SERVER); for a local cluster with a "
            "dashboard run: compute JOB.yaml --dashboard"
        )
    port = http_port if http_port is not None else settings.http_port
    if not port:
        raise ConfigError(
            "dashboard needs the server's HTTP port: set REMAP_HTTP_PORT or pass --http-port "
            "(the server must be started with --http-port too)"
        )
    host, _ = parse_address(settings.server)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls_enabled(settings) else 'http'}://{host}:{port}"


def bearer_token(settings: Settings) -> str:
    """The HTTP API's bearer token, computed here from the settings (no server contacted)."""
    return http_token(settings, client_secret(settings))


def login_link(settings: Settings, http_port: int | None = None, timeout: float = 10.0) -> str:
    """A fresh one-time login URL from the server."""
    base = http_base(settings, http_port)
    token = bearer_token(settings)
    request = urllib.request.Request(
        f"{base}/api/v1/login-links",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        data=b"{}",
    )
    context = None
    if base.startswith("https"):
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
            return json.loads(reply.read())["url"]
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise AuthError(
                f"the HTTP API at {base} refused our token: use the server's REMAP_SECRET_KEY "
                "or REMAP_HTTP_TOKEN"
            ) from None
        raise ServerUnreachable(f"the HTTP API at {base} answered {exc.code}") from None
    except http.client.HTTPException as exc:  # it answers, but not in HTTP
        raise ServerUnreachable(
            f"{base} did not answer as the HTTP API ({type(exc).__name__}): is that the "
            "server's HTTP port (its --http-port), not its cluster port (7878 by default)?"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnreachable(f"cannot reach the HTTP API at {base}: {reason}") from None
