"""Endpoints (TCP or TLS) and the client connection shared by nodes and consoles."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    HostnameEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory

from protocol import Authenticated, Connection, messages as m
from protocol.errors import ConfigError, RemapError

from .settings import Settings
from .wire import PeerProtocol


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def tls_enabled(settings: Settings) -> bool:
    return bool(settings.tls_cert or settings.tls_key or settings.tls_ca)


def server_endpoint(reactor: Any, settings: Settings, host: str, port: int) -> Any:
    """A listening endpoint: TLS when a certificate is configured (client certs checked with a CA)."""
    if not tls_enabled(settings):
        if ":" in host:
            return TCP6ServerEndpoint(reactor, port, interface=host)
        return TCP4ServerEndpoint(reactor, port, interface=host)
    from OpenSSL import SSL  # noqa: F401  (pyOpenSSL comes with twisted[tls])
    from twisted.internet import ssl

    if not (settings.tls_cert and settings.tls_key):
        raise ConfigError("TLS on the server needs both REMAP_TLS_CERT and REMAP_TLS_KEY")
    cert = ssl.PrivateCertificate.loadPEM(_read(settings.tls_cert, "certificate") + b"\n"
                                          + _read(settings.tls_key, "key"))
    kwargs: dict[str, Any] = {}
    if settings.tls_ca:
        ca = ssl.Certificate.loadPEM(_read(settings.tls_ca, "CA certificate"))
        kwargs = {"verify": True, "caCerts": [ca.original], "requireCertificate": True}
    options = ssl.CertificateOptions(privateKey=cert.privateKey.original,
                                     certificate=cert.original, **kwargs)
    return SSL4ServerEndpoint(reactor, port, options, interface=host)


def client_endpoint(reactor: Any, settings: Settings, host: str, port: int, timeout: float = 10) -> Any:
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if not tls_enabled(settings):
        return endpoint
    from twisted.internet import ssl

    trust = ssl.Certificate.loadPEM(_read(settings.tls_ca, "CA certificate")) if settings.tls_ca else None
    client_cert = None
    if settings.tls_cert and settings.tls_key:
        client_cert = ssl.PrivateCertificate.loadPEM(_read(settings.tls_cert, "certificate") + b"\n"
                                                     + _read(settings.tls_key, "key"))
    options = ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert)
    return wrapClientTLS(options, endpoint)


class PeerFactory(Factory):
    """Builds client-side PeerProtocols for a given role and handler."""

    def __init__(self, reactor: Any, role: str, secret: bytes, handler: Any, settings: Settings,
                 name: str = "") -> None:
        self.reactor = reactor
        self.role = role
        self.secret = secret
        self.handler = handler
        self.settings = settings
        self.name = name

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        conn = Connection(self.role, self.secret, max_frame=self.settings.max_frame,
                          heartbeat=self.settings.heartbeat_interval, name=self.name)
        proto = PeerProtocol(conn, self.handler, self.reactor,
                             handshake_timeout=self.settings.handshake_timeout,
                             heartbeat_interval=self.settings.heartbeat_interval,
                             heartbeat_misses=self.settings.heartbeat_misses)
        proto.factory = self
        return proto


class AuthWaiter:
    """Wraps a handler so a one-off client can wait for authentication (or its failure)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ready: defer.Deferred[PeerProtocol] = defer.Deferred()

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None:
        self.inner.authenticated(link, event)
        if not self.ready.called:
            self.ready.callback(link)

    def message_received(self, link: PeerProtocol, msg: m.Message) -> None:
        self.inner.message_received(link, msg)

    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None:
        self.inner.connection_failed(link, error)
        if not self.ready.called:
            self.ready.errback(error)

    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None:
        self.inner.connection_lost(link, error)
        if not self.ready.called:
            self.ready.errback(error)

    def heartbeat(self) -> m.Heartbeat:
        return self.inner.heartbeat()
