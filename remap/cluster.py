"""The composition root: a server, a node, an embedded cluster. The only module that imports both
the server and the node side; clients that dial a remote cluster never load it."""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger

from .auth import client_secret, server_secret
from .client import ClusterClient
from .data.layout import DataDirReport
from .dial import connect_failure
from .errors import ConfigError, ServerUnreachable
from .local import connect_local, in_one_turn
from .net import (
    PeerFactory,
    authenticated,
    cannot_listen,
    client_endpoint,
    server_endpoint,
    tls_enabled,
)
from .node.agent import NodeAgent
from .node.cores import CorePool
from .server.service import RemapServerFactory
from .settings import Settings, parse_address

log = Logger()


#: seconds a node's attempt to connect to its server waits for an answer
CONNECT_TIMEOUT = 10.0
#: node reconnection: the first retry after about RETRY_FIRST s, growing by RETRY_FACTOR to RETRY_MAX
RETRY_FIRST = 0.5
RETRY_FACTOR = 1.6
RETRY_MAX = 30.0


def reconnect_delays(rng: random.Random | None = None) -> Callable[[int], float]:
    """A retry policy for ``ClientService``: exponential backoff with "equal jitter" (between
    half and all of the step, so nodes that lost one server do not return in a burst), to 0.1 s.
    """
    draw = (rng or random.SystemRandom()).random

    def delay(attempt: int) -> float:
        step = min(RETRY_MAX, RETRY_FIRST * RETRY_FACTOR ** min(attempt, 64))
        return max(0.1, round(step * (0.5 + 0.5 * draw()), 1))

    return delay


class NamedEndpoint:
    """A client endpoint whose repr is ``tcp:HOST:PORT`` or ``tls:HOST:PORT`` (for log lines).

    It also keeps ``ClientService`` quiet about a connection its ``prepareConnection`` refused
    (counted as failed already; Twisted's state machine would raise ``NoTransition`` out of
    ``connectionLost``: a traceback on every failed handshake).
    """

    def __init__(self, inner: Any, name: str, timeout: float = CONNECT_TIMEOUT) -> None:
        self.inner = inner
        self.name = name
        self.timeout = timeout
        #: the last reason logged for a failed attempt: said again only when it changes
        self._said: str | None = None

    def connect(self, factory: Any) -> defer.Deferred:
        """Connect; a failure is logged with its reason (ClientService says only "Scheduling
        retry"), once until the reason changes or a connection is made."""
        made = self.inner.connect(_RefusedQuietly(factory))

        def connected(proto: Any) -> Any:
            self._said = None
            return proto

        def failed(failure: Any) -> Any:
            if failure.check(defer.CancelledError, ConnectingCancelledError):  # stopping
                return failure
            reason = connect_failure(failure.value, self.timeout)
            if reason != self._said:
                self._said = reason
                address = self.name.partition(":")[2]
                log.warn(
                    "cannot reach the server at {address}: {reason}; trying again",
                    address=address,
                    reason=reason,
                )
            return failure

        return made.addCallbacks(connected, failed)

    def __repr__(self) -> str:
        return self.name


class _RefusedQuietly:
    """Wraps the factory ``ClientService`` hands its endpoint (see :class:`NamedEndpoint`)."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
        proto = self.factory.buildProtocol(addr)
        if proto is not None:
            lost = proto.connectionLost

            def connection_lost(reason: Any) -> Any:
                try:
                    return lost(reason)
                except NoTransition:  # refused while being prepared: counted already
                    log.debug("connection to the server lost before it was ready")

            proto.connectionLost = connection_lost
        return proto

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)


def default_cores() -> int:
    """A node's default: every CPU but one, left for the machine's owner and the node itself."""
    return max(1, (os.cpu_count() or 2) - 1)


def embedded_cores() -> int:
    """The embedded cluster's default: every CPU, like multiprocessing.Pool and loky."""
    return max(1, os.cpu_count() or 1)


class Stopping(Service):
    """A part of a server that only needs stopping (the HTTP face, the LAN advert, the
    journal), as a child service: ``stop`` may return a Deferred or a coroutine."""

    def __init__(self, name: str, stop: Callable[[], Any]) -> None:
        self.setName(name)
        self._stop = stop

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        return defer.maybeDeferred(self._stop)  # a coroutine too


class ServerService(MultiService):
    """A listening server and what hangs off it. Stopping it drops every connection, stops the
    scheduler's timers and the detached jobs' drivers, stops listening, then stops its children
    one at a time, the last added first (so the journal, added first, closes last)."""

    def __init__(self, factory: RemapServerFactory, port: Any, host: str) -> None:
        super().__init__()
        self.factory, self.port, self.host = factory, port, host

    @property
    def address(self) -> str:
        port = self.port.getHost().port
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def scheduler(self) -> Any:
        return self.factory.scheduler

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        for link in list(self.factory.consoles):
            link.abort()
        self.factory.scheduler.nodes_leaving()  # the server drops them: no "node lost"
        for node in list(self.factory.scheduler.nodes.values()):
            node.link.abort()
        self.factory.scheduler.stop()
        self.factory.drivers.stop()
        await defer.maybeDeferred(self.port.stopListening)
        for child in reversed(list(self)):
            await defer.maybeDeferred(child.stopService)

    async def stop(self) -> None:
        await self.stopService()


async def start_server(
    reactor: Any, settings: Settings, *, secret: bytes | None = None
) -> ServerService:
    """Listen on ``settings.host:settings.port``; refuses a public bind without a secret."""
    key = secret or server_secret(settings, settings.host)
    factory = RemapServerFactory(
        reactor,
        key,
        max_frame=settings.max_frame,
        handshake_timeout=settings.handshake_timeout,
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_misses=settings.heartbeat_misses,
        console_grace=settings.console_grace,
        preempt_grace=settings.preempt_grace,
        max_handshaking=settings.max_handshaking,
        max_handshaking_per_host=settings.max_handshaking_per_host,
        results_memory=settings.detached_results_memory,
        results_memory_total=settings.detached_results_memory_total,
        results_keep=settings.detached_results_keep_hours * 3600.0,
    )
    try:
        port = await server_endpoint(reactor, settings, settings.host, settings.port).listen(
            factory
        )
    except ConfigError:  # the TLS settings' own line (as the HTTP face says it)
        raise
    except Exception as exc:  # CannotListenError and friends: say which address, plainly
        raise cannot_listen("", settings.host, settings.port, exc) from None
    from .data.layout import DataDir
    from .server.drivers import Drivers, child_dial_host, child_env

    factory.use_drivers(
        Drivers(
            reactor,
            factory.scheduler,
            data_dir=DataDir.from_setting(settings.data_dir).root,
            cluster_address=f"{child_dial_host(settings)}:{port.getHost().port}",
            child_env=child_env(settings, key),
        )
    )
    server = ServerService(factory, port, settings.host)
    server.startService()
    return server


class Cores(Service):
    """A node's core processes as a service: started with the node, stopped after its
    connection (their work is the server's to reassign)."""

    def __init__(self, pool: CorePool) -> None:
        self.pool = pool

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self.pool.start()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        return defer.maybeDeferred(self.pool.stop)


def _core_pool(reactor: Any, settings: Settings, size: int) -> CorePool:
    """A node's cores; its agent routes their answers (it sets the pool's result handlers)."""
    return CorePool(
        reactor, size, lambda r: None, lambda r: None, start_timeout=settings.core_start_timeout
    )


class NodeService(MultiService):
    """A node: its cores and (unless it is the embedded cluster's, joined in-process) its
    connection to the server, a ``ClientService`` that counts a connection as made once it
    has authenticated; stopping it drops the connection, then the cores."""

    def __init__(self, pool: CorePool, agent: NodeAgent, connection: ClientService | None) -> None:
        super().__init__()
        self.pool, self.agent, self.connection = pool, agent, connection
        #: what the server is told in the node's ``goodbye`` (see :meth:`stop`)
        self.leaving = "stopping"
        Cores(pool).setServiceParent(self)
        if connection is not None:
            connection.setServiceParent(self)

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        # goodbye before the connection ends: the server re-queues this node's work at once
        # and neither side takes the end for a loss
        self.agent.leave(self.leaving)
        return super().stopService()

    async def stop(self, reason: str = "stopping") -> None:
        """Stop as asked; ``reason`` is what the server's log says of this node's leaving."""
        self.leaving = reason
        await self.stopService()


def start_node(
    reactor: Any,
    settings: Settings,
    *,
    on_shutdown: Any = None,
    on_auth_failure: Any = None,
    data: DataDirReport | None = None,
) -> NodeService:
    """Start cores and keep a connection to the server, reconnecting with backoff and jitter;
    an attempt that does not authenticate counts as failed (the next one waits longer)."""
    host, port = parse_address(settings.server or f"127.0.0.1:{settings.port}")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    key = client_secret(settings)
    pool = _core_pool(reactor, settings, settings.cores or default_cores())
    agent = NodeAgent(
        pool,
        group=settings.group,
        host=settings.node_name,
        on_shutdown=on_shutdown,
        on_auth_failure=on_auth_failure,
        data=data,
    )
    factory = PeerFactory(reactor, "node", key, agent, settings, wait_for_auth=True)
    scheme = "tls" if tls_enabled(settings) else "tcp"
    connection = ClientService(
        NamedEndpoint(
            client_endpoint(reactor, settings, host, port, timeout=CONNECT_TIMEOUT),
            f"{scheme}:{address}",
        ),
        factory,
        retryPolicy=reconnect_delays(),
        clock=reactor,
        prepareConnection=authenticated,
    )
    node = NodeService(pool, agent, connection)
    node.startService()
    return node


class EmbeddedCluster:
    """A server and a node inside this process's reactor, cores as child processes; its node
    and console join over in-process links, and the server listens on an ephemeral loopback
    port with a random secret that never leaves the process."""

    def __init__(self, reactor: Any, settings: Settings, cores: int | None = None) -> None:
        self.reactor = reactor
        # text, so a console child (a job submitted over HTTP) can be given it in its environment
        self.secret = secrets.token_urlsafe(32).encode()
        self.settings = replace(
            settings, host="127.0.0.1", port=0, tls_cert=None, tls_key=None, tls_ca=None
        )
        self.cores = cores or settings.cores or embedded_cores()
        self.server: ServerService | None = None
        self.node: NodeService | None = None
        self.http: Any = None  # the HTTP API and dashboard, once start_dashboard is called
        #: ``in_one_turn(fn, *args)``, for calls from other threads (see :func:`in_one_turn`)
        self.in_one_turn = in_one_turn(reactor)

    async def start(self) -> str:
        """Start the server and the node; the node joins over an in-process link (no sockets)."""
        self.server = await start_server(self.reactor, self.settings, secret=self.secret)
        pool = _core_pool(self.reactor, self.settings, self.cores)
        agent = NodeAgent(pool)
        pool.read_turn = self.in_one_turn
        self.node = NodeService(pool, agent, None)
        self.node.startService()
        link = connect_local(self.reactor, self.server.factory, agent, "node", agent.host)
        Stopping("in-process link", link.close).setServiceParent(self.node)
        return self.server.address

    async def connect(self) -> ClusterClient:
        """A console on an in-process link: no framing, no loopback round trips."""
        assert self.server is not None
        client = ClusterClient()
        connect_local(self.reactor, self.server.factory, client, "console", "embedded console")
        return client

    async def start_dashboard(self) -> str:
        """Serve the HTTP API and dashboard on loopback (REMAP_HTTP_PORT, or a free port).

        Returns a one-time login link; the bearer token is derived from this cluster's
        private secret unless REMAP_HTTP_TOKEN is set.
        """
        from .server.http import start_http

        assert self.server is not None
        if self.http is None:
            settings = replace(
                self.settings, http_host="127.0.0.1", http_port=self.settings.http_port or 0
            )
            self.http = await start_http(
                self.reactor,
                settings,
                self.server.factory,
                self.secret,
                cluster_port=self.server.port.getHost().port,
            )
            Stopping("http", self.http.stop).setServiceParent(self.server)
        return self.http.login_url()

    async def stop(self) -> None:
        """The node (its link, then its cores), then the server (with its HTTP face)."""
        if self.node is not None:
            if self.server is not None:
                self.server.scheduler.nodes_leaving()  # a stop asked for: no "node lost"
            await self.node.stop()
        if self.server is not None:
            await self.server.stop()

    async def until_node_joined(self, timeout: float) -> None:
        """Wait (on the reactor) until the embedded node registered, so the handle is ready."""
        deadline = self.reactor.seconds() + timeout
        assert self.server is not None
        while not self.server.scheduler.nodes:
            if self.reactor.seconds() > deadline:
                raise ServerUnreachable(
                    f"the embedded cluster's node did not join within {timeout:g}s"
                )
            await task.deferLater(self.reactor, 0.02, lambda: None)
