"""Dialling a cluster as a console: connect, authenticate, one clear error when impossible.

Client side only: importing this loads no server or node module.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import defer, error

from protocol.errors import HandshakeTimeout, RemoteProtocolError, ServerBusy

from .auth import client_secret
from .client import ClusterClient
from .errors import AuthError, ServerUnreachable, VersionMismatch
from .net import PeerFactory, authenticated, client_endpoint
from .settings import Settings, parse_address


async def connect_console(
    reactor: Any,
    settings: Settings,
    address: str,
    *,
    secret: bytes | None = None,
    timeout: float = 10.0,
) -> ClusterClient:
    """Connect and authenticate, or raise one clear RemapError. The client dials the same way
    again to resume a job when the connection is lost (``REMAP_CONSOLE_GRACE``)."""
    key = secret or client_secret(settings)
    client = ClusterClient(clock=reactor, grace=settings.console_grace)
    await _dial(reactor, settings, address, key, client, timeout)
    client.redial = lambda: defer.ensureDeferred(
        _dial(reactor, settings, address, key, client, timeout)
    )
    return client


async def _dial(
    reactor: Any,
    settings: Settings,
    address: str,
    key: bytes,
    client: ClusterClient,
    timeout: float,
) -> None:
    """One connection of ``client`` to ``address``, authenticated."""
    host, port = parse_address(address)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # the port, if defaulted
    factory = PeerFactory(reactor, "console", key, client, settings, wait_for_auth=True)
    # outside the try: a TLS setting it cannot use is a ConfigError (exit 2), not "cannot reach"
    endpoint = client_endpoint(reactor, settings, host, port, timeout=timeout)
    try:
        link = await endpoint.connect(factory)
    except Exception as exc:
        reason = connect_failure(exc, timeout)
        raise ServerUnreachable(f"cannot reach the server at {address}: {reason}") from None
    try:
        await authenticated(link)
    except (AuthError, VersionMismatch):
        raise
    except ServerBusy as exc:  # its connection caps were full: it said so, then closed
        why = getattr(exc, "peer_message", "") or str(exc)
        raise ServerUnreachable(
            f"the server at {address} refused the connection: {why}; try again in a moment"
        ) from None
    except (HandshakeTimeout, RemoteProtocolError) as exc:
        raise ServerUnreachable(not_remap(address, exc)) from None
    except Exception as exc:
        reason = _reason(exc)
        if reason.startswith("TLS with"):  # the TLS layer said why: no guessing about a close
            raise ServerUnreachable(f"cannot connect to {address}: {reason}") from None
        raise ServerUnreachable(
            f"server at {address} closed the connection during the handshake: {reason}"
        ) from None


def not_remap(address: str, exc: BaseException) -> str:
    """A peer that answers, but not in remap (the HTTP port, another service); a node's log
    says it too."""
    return (
        f"{address} did not answer as a remap server ({_reason(exc)}): is that the "
        "server's port (7878 by default), not its HTTP port?"
    )


def connect_failure(exc: BaseException, timeout: float) -> str:
    """Why a TCP connection could not be made, in words (a node's log says it too)."""
    if isinstance(exc, error.TimeoutError):  # Twisted: "User timeout caused connection failure"
        return (
            f"no answer within {timeout:g}s (is the address right, the machine up, and its "
            "TCP port open in any firewall?)"
        )
    if isinstance(exc, error.ConnectError) and exc.osError in _UNROUTABLE:
        # Twisted: "An error occurred while connecting: 113: No route to host."
        return f"{os.strerror(exc.osError).lower()} (is the machine on, and on this network?)"
    return _reason(exc)


#: errnos of an address nothing answers for: no host there (no ARP reply), no route to it
_UNROUTABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, error.ConnectionRefusedError):  # Twisted's text says it twice
        return "connection refused (is the server running, and on that port?)"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
