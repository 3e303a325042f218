"""Endpoints (TCP or TLS) and the client connection shared by nodes and consoles."""

from __future__ import annotations

import functools
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.protocol import Factory

from protocol import Authenticated, Connection

from .errors import ConfigError, RemapError
from .settings import Settings
from .wire import PeerProtocol

#: pending connections the kernel queues for the server: a burst of connects (a garbage flood,
#: a hundred nodes restarting) must not push a console's connect into SYN retries
LISTEN_BACKLOG = 1024

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _certificates(path: str, what: str) -> list[Any]:
    """Every certificate in a PEM file, in order (a leaf and its chain, or a CA bundle)."""
    from twisted.internet import ssl

    blocks = _PEM_CERTIFICATE.findall(_read(path, what))
    if not blocks:
        raise ConfigError(f"{what} {path} holds no PEM certificate")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as exc:  # OpenSSL's errors name no file: say which one
        raise ConfigError(f"{what} {path} is not a valid PEM certificate: {exc}") from None


def _identity(settings: Settings) -> tuple[Any, list[Any]]:
    """(certificate with its private key, the rest of its chain) from REMAP_TLS_CERT/KEY."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    chain = _certificates(settings.tls_cert or "", "certificate")
    key_pem = _read(settings.tls_key or "", "key")
    try:
        identity = ssl.PrivateCertificate.loadPEM(chain[0].dumpPEM() + b"\n" + key_pem)
        check = SSL.Context(SSL.TLS_METHOD)
        check.use_certificate(identity.original)
        check.use_privatekey(identity.privateKey.original)
        check.check_privatekey()
    except Exception as exc:
        raise ConfigError(
            f"key {settings.tls_key} is not a valid PEM private key for certificate "
            f"{settings.tls_cert}: {exc or type(exc).__name__}"
        ) from None
    return identity, chain[1:]


def tls_enabled(settings: Settings) -> bool:
    return bool(settings.tls_cert or settings.tls_key or settings.tls_ca)


@functools.cache
def _closing_tls() -> type:
    """The TLS factory every TLS connection here goes through (built on first use: OpenSSL is
    imported only then)."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    class ClosingTLS(TLSMemoryBIOFactory.protocol):  # type: ignore[name-defined,misc]
        """A TLS connection whose close is cut (aborted) once it has waited ``close_timeout``
        s: TLS's close waits for the peer's ``close_notify`` (and for what it has not read),
        so a peer frozen, buggy or behind a dead network held the socket and its buffers for
        ever, whoever closed (a node or console dropped, an HTTP response, a shutdown)."""

        _cut: Any = None

        def loseConnection(self) -> None:  # noqa: N802 - Twisted's name
            super().loseConnection()
            if self._cut is None and self.connected:
                factory = self.factory
                self._cut = factory.clock.callLater(factory.close_timeout, self.abortConnection)

        def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
            if self._cut is not None and self._cut.active():
                self._cut.cancel()
            super().connectionLost(reason)

    class ClosingTLSFactory(TLSMemoryBIOFactory):
        protocol = ClosingTLS

        def __init__(
            self, options: Any, is_client: bool, wrapped: Any, clock: Any, close_timeout: float
        ) -> None:
            super().__init__(options, is_client, wrapped, clock=clock)
            self.clock = clock
            #: seconds a close may take before the connection is cut
            self.close_timeout = close_timeout

    return ClosingTLSFactory


class _TLSEndpoint:
    """An endpoint wrapping ``inner`` in TLS, with timers on the given reactor; a connection's
    close has ``close_timeout`` s (see :func:`_closing_tls`)."""

    def __init__(self, reactor: Any, inner: Any, options: Any, close_timeout: float) -> None:
        self.reactor = reactor
        self.inner = inner
        self.options = options
        self.close_timeout = close_timeout

    def _wrap(self, factory: Any, is_client: bool) -> Any:
        return _closing_tls()(self.options, is_client, factory, self.reactor, self.close_timeout)


class TLSServerEndpoint(_TLSEndpoint):
    """A listening endpoint (``SSL4ServerEndpoint`` uses the global reactor, maybe not
    running, and has no IPv6)."""

    def listen(self, factory: Any) -> defer.Deferred:
        return self.inner.listen(self._wrap(factory, False))


class TLSClientEndpoint(_TLSEndpoint):
    """A connecting endpoint (Twisted's ``wrapClientTLS``, its close bounded)."""

    def connect(self, factory: Any) -> defer.Deferred:
        connected = self.inner.connect(self._wrap(factory, True))
        return connected.addCallback(lambda proto: proto.wrappedProtocol)


def cannot_listen(what: str, host: str, port: int, exc: Exception) -> ConfigError:
    """One line for a failed listen (Twisted's text repeats the address; a busy port gets
    what to do about it)."""
    reason = getattr(exc, "socketError", None) or exc
    text = getattr(reason, "strerror", None) or str(reason)
    hint = " (another server running? choose another port)" if "in use" in text else ""
    if text[1:2].islower():  # "Address already in use", not "TLS ..." or "SSL ..."
        text = text[:1].lower() + text[1:]
    return ConfigError(f"cannot listen{what} on {host}:{port}: {text}{hint}")


def server_endpoint(reactor: Any, settings: Settings, host: str, port: int) -> Any:
    """A listening endpoint: TLS when a certificate is configured (REMAP_TLS_CERT may hold
    its chain too); client certificates checked against REMAP_TLS_CA (several CAs) if set."""
    if ":" in host:
        tcp = TCP6ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)
    else:
        tcp = TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)
    if not tls_enabled(settings):
        return tcp
    from twisted.internet import ssl

    if not (settings.tls_cert and settings.tls_key):
        raise ConfigError("TLS on the server needs both REMAP_TLS_CERT and REMAP_TLS_KEY")
    identity, chain = _identity(settings)
    kwargs: dict[str, Any] = {}
    if settings.tls_ca:
        cas = _certificates(settings.tls_ca, "CA certificate")
        kwargs = {
            "verify": True,
            "caCerts": [ca.original for ca in cas],
            "requireCertificate": True,
        }
    options = ssl.CertificateOptions(
        privateKey=identity.privateKey.original,
        certificate=identity.original,
        extraCertChain=[c.original for c in chain],
        **kwargs,
    )
    return TLSServerEndpoint(reactor, tcp, options, settings.handshake_timeout)


def client_endpoint(
    reactor: Any, settings: Settings, host: str, port: int, timeout: float = 10
) -> Any:
    """A connecting endpoint: TLS verifying the server against REMAP_TLS_CA when TLS is
    configured, its timers on ``reactor``."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if not tls_enabled(settings):
        return endpoint
    from twisted.internet import ssl

    trust = None
    if settings.tls_ca:
        trust = ssl.trustRootFromCertificates(_certificates(settings.tls_ca, "CA certificate"))
    client_cert = None
    extra: dict[str, Any] = {}
    if settings.tls_cert and settings.tls_key:
        client_cert, chain = _identity(settings)
        extra = {"extraCertChain": [c.original for c in chain]}
    elif settings.tls_cert or settings.tls_key:
        raise ConfigError("a client certificate needs both REMAP_TLS_CERT and REMAP_TLS_KEY")
    options = ssl.optionsForClientTLS(
        host, trustRoot=trust, clientCertificate=client_cert, extraCertificateOptions=extra or None
    )
    return TLSClientEndpoint(reactor, endpoint, options, settings.handshake_timeout)


class PeerFactory(Factory):
    """Builds client-side PeerProtocols for a given role and handler; with ``wait_for_auth``
    each connection's handler is wrapped in an :class:`AuthWaiter`, so the dialler can wait
    for it to authenticate (:func:`authenticated`)."""

    noisy = False  # no "Starting factory <... at 0x...>" line per connection attempt

    def __init__(
        self,
        reactor: Any,
        role: str,
        secret: bytes,
        handler: Any,
        settings: Settings,
        *,
        wait_for_auth: bool = False,
    ) -> None:
        self.reactor = reactor
        self.role = role
        self.secret = secret
        self.handler = handler
        self.settings = settings
        self.wait_for_auth = wait_for_auth

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        conn = Connection(
            self.role,
            self.secret,
            max_frame=self.settings.max_frame,
            heartbeat=self.settings.heartbeat_interval,
            # a console may be a person (their key in REMAP_SECRET_KEY); a node never is
            user=(self.settings.user or "") if self.role == "console" else "",
        )
        proto = PeerProtocol(
            conn,
            AuthWaiter(self.handler) if self.wait_for_auth else self.handler,
            self.reactor,
            handshake_timeout=self.settings.handshake_timeout,
            heartbeat_interval=self.settings.heartbeat_interval,
            heartbeat_misses=self.settings.heartbeat_misses,
        )
        proto.factory = self
        return proto


def authenticated(protocol: Any) -> defer.Deferred[PeerProtocol]:
    """Fires once a new connection of a ``wait_for_auth`` :class:`PeerFactory` has
    authenticated, fails if it is refused or lost first (the node's ``prepareConnection``: a
    server that never completes a handshake is retried with growing delays)."""
    return protocol.handler.ready


class AuthWaiter:
    """Wraps a connection's handler until it authenticates, so the dialler can wait for that
    (or its failure). No message or heartbeat comes before :meth:`authenticated`, which hands
    the link to the handler itself."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ready: defer.Deferred[PeerProtocol] = defer.Deferred()

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None:
        self.inner.authenticated(link, event)
        # from now on the connection hands events to the handler itself
        link.handler = self.inner
        if not self.ready.called:
            self.ready.callback(link)

    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None:
        self.inner.connection_failed(link, error)
        if not self.ready.called:
            self.ready.errback(error)

    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None:
        self.inner.connection_lost(link, error)
        if not self.ready.called:
            self.ready.errback(error)
