"""The server's HTTP face: JSON API, event stream, Prometheus metrics and the dashboard.

It runs on the server's reactor, on its own port (``REMAP_HTTP_PORT``), loopback unless told
otherwise, with the cluster port's certificate when TLS is configured (browsers log in with a
token rather than a client certificate, so no client certificate is asked for).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from ...data.layout import DataDir
from ...errors import ConfigError
from ...net import cannot_listen, server_endpoint, tls_enabled
from ...settings import Settings
from ..admission import Admission, RefusalLog, Refused, Slot, peer_host
from ..drivers import child_dial_host, child_env
from .app import DispatchResource, HttpApp
from .events import EventHub
from .metrics import ServerStats
from .security import HttpAuth, http_token
from .submit import Submitter
from .views import snapshot

log = Logger()


def access_line(timestamp: str, request: Any) -> str:
    """An access-log line without the query string or headers (a login token must not leak)."""
    peer = getattr(request.getClientAddress(), "host", "-")
    method = request.method.decode("ascii", "replace")
    path = request.path.decode("ascii", "replace")[:200]
    return f'{peer} - - {timestamp} "{method} {path}" {request.code} {request.sentLength or "-"}'


#: seconds a connection may sit idle or half-sent (not Twisted's 12 hours); a response being
#: written, an event stream too, is not idle
IDLE_TIMEOUT = 60


class BoundedChannel(HTTPChannel):
    """A request must arrive whole within :data:`IDLE_TIMEOUT` of the channel being ready for it.

    Twisted restarts the idle timer at every byte received, so a client trickling a header byte
    a minute held a connection, unauthenticated, for days. Here bytes do not restart it: it runs
    from the connection's start or the previous answer's end, off while a request is answered.
    """

    #: this connection's place under the port's caps (freed when it closes)
    slot: Slot | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        LineReceiver.dataReceived(self, data)

    def loseConnection(self) -> None:  # noqa: N802 - Twisted's name
        """Close after the response, cut ``abortTimeout`` s later if the client has not taken it
        (Twisted bounds only its idle timeout's close: one that ended a response unread held its
        connection and its place under the caps for ever). Under TLS the TLS layer bounds it."""
        if self._abortingCall is None and not ISSLTransport.providedBy(self.transport):
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        super().loseConnection()

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        """The client takes nothing more: read and answer nothing more of what it sent, and a
        response being written counts as idle. Twisted answered the requests it had read while
        the client read nothing (a pipeline of health checks buffered their answers without
        bound) and kept its idle timeout off for a response, so a stream the client stopped
        reading held its connection for ever."""
        super().pauseProducing()
        self.paused = True  # (LineReceiver parses nothing more of what it holds)
        self._networkProducer.pauseProducing()
        if self._handlingRequest:
            self.setTimeout(self._savedTimeOut)  # (Twisted set the idle timeout aside)

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        super().resumeProducing()
        if self._handlingRequest:
            self.setTimeout(None)
        self.paused = False
        self.dataReceived(b"")  # what it held

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if self.slot is not None:
            self.slot.release()
        super().connectionLost(reason)


class BoundedSite(Site):
    """A site that holds at most so many connections, in all and per client address."""

    def __init__(
        self,
        resource: Any,
        *,
        reactor: Any,
        max_connections: int = Settings.http_max_connections,
        max_per_host: int = Settings.http_max_connections_per_host,
        close_timeout: float = Settings.handshake_timeout,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, **kwargs)
        #: half the places only for addresses that sent credentials before (see Admission)
        self.connections = Admission(max_connections, max_per_host, reserved=max_connections // 2)
        #: seconds a close may wait for the client to take what is queued (REMAP_HANDSHAKE_TIMEOUT,
        #: as a TLS close has)
        self.close_timeout = close_timeout
        self.refusals = RefusalLog(reactor, "HTTP port")
        self.requestFactory = BoundedRequest
        self.protocol = BoundedChannel  # plain HTTP/1.1 (no HTTP/2 negotiation: h2 is not used)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
        host = peer_host(addr)
        slot = self.connections.admit(host)
        if not isinstance(slot, Slot):
            self.refusals.refused(host, slot, self.connections)
            return Refused()
        channel = super().buildProtocol(addr)
        channel.slot = slot
        channel.abortTimeout = self.close_timeout
        return channel


#: bytes a request body may have (a job file is at most 64 KiB); a larger one drops the connection
MAX_REQUEST_BODY = 256 * 1024


class BoundedRequest(Request):
    """A request whose body is bounded before anything is authenticated (no memory to fill)."""

    _body_bytes = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self._refused:  # the rest of the bytes already read in this turn: dropped
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_REQUEST_BODY:  # chunked bodies have no length up front
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        self.channel.transport.abortConnection()

    def write(self, data: bytes) -> None:
        refused = self.code == 401 or getattr(self, "unauthenticated", False)
        if not self.startedWriting and refused and self.channel is not None:
            # no keep-alive without credentials: a client cannot hold the connection (and its
            # slot) by sending a complete unauthenticated request every minute
            self.setHeader(b"Connection", b"close")
            self.channel.persistent = False
        super().write(data)


@dataclass
class RunningHttp:
    app: HttpApp
    port: Any
    url: str
    #: the port's connection caps (the server keeps their trusted sources across restarts)
    connections: Admission

    def login_url(self) -> str:
        """A fresh one-time login link for a browser."""
        return f"{self.url}/login?token={self.app.auth.new_login_token()}"

    async def stop(self) -> None:
        self.app.hub.stop()
        self.app.stats.close()
        await defer.maybeDeferred(self.port.stopListening)


def display_host(host: str) -> str:
    """The host part of URLs we print: this machine's name for a wildcard bind."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


async def start_http(
    reactor: Any,
    settings: Settings,
    factory: Any,
    secret: bytes,
    *,
    tick: float = 1.0,
    cluster_port: int | None = None,
) -> RunningHttp:
    """Listen on ``http_host:http_port`` serving the API for ``factory``'s scheduler.

    ``cluster_port`` is where the server takes consoles: jobs submitted over HTTP (when
    ``REMAP_APPS_DIR`` is set) run in a console child that connects there.
    """
    host, port = settings.http_host, settings.http_port or 0
    if settings.apps_dir and not Path(settings.apps_dir).expanduser().is_dir():
        raise ConfigError(  # else every job submitted over HTTP is refused, saying less
            f"REMAP_APPS_DIR: {settings.apps_dir} is not a directory (jobs submitted over HTTP "
            "may only run functions from files in it)"
        )
    tls = tls_enabled(settings)
    stats = ServerStats(factory.scheduler, factory.traffic)
    auth = HttpAuth(reactor, http_token(settings, secret), (settings.http_hosts or "").split(","))
    hub = EventHub(
        reactor,
        lambda: snapshot(factory.scheduler, stats, factory.drivers),
        stats.sample,
        lambda: [list(point) for point in stats.history],
        interval=tick,
    )
    submitter = Submitter(
        reactor,
        factory.scheduler,
        apps_dir=settings.apps_dir,
        data_dir=DataDir.from_setting(settings.data_dir).root,
        cluster_address=(
            f"{child_dial_host(settings)}:{cluster_port}" if cluster_port is not None else None
        ),
        child_env=child_env(settings, secret),
    )
    app = HttpApp(factory, auth, stats, hub, submitter, tls=tls)
    site = BoundedSite(
        DispatchResource(app),
        reactor=reactor,
        logFormatter=access_line,
        timeout=IDLE_TIMEOUT,
        max_connections=settings.http_max_connections,
        max_per_host=settings.http_max_connections_per_host,
        close_timeout=settings.handshake_timeout,
    )
    site.displayTracebacks = False
    try:
        endpoint = server_endpoint(reactor, replace(settings, tls_ca=None), host, port)
        listening = await endpoint.listen(site)
    except Exception as exc:
        stats.close()
        if isinstance(exc, ConfigError):  # the TLS settings' own line
            raise
        raise cannot_listen(" for HTTP", host, port, exc) from None
    hub.start()
    bound = listening.getHost().port
    url = f"{'https' if tls else 'http'}://{display_host(host)}:{bound}"
    log.info("HTTP API and dashboard on {url}", url=url)
    return RunningHttp(app, listening, url, site.connections)
