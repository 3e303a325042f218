"""The composition root: a server, a node, an embedded cluster. The only module that imports both
the server and the node side; clients that dial a remote cluster never load it."""

from __future__ import annotations

import functools
import os
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.logger import Logger

from .auth import client_secret, server_secret
from .client import ClusterClient
from .data.layout import DataDirReport
from .dial import connect_console  # noqa: F401  (the embedded cluster's users dial too)
from .errors import ConfigError, ServerUnreachable
from .local import connect_local, deliver_now
from .net import PeerFactory, client_endpoint, server_endpoint, tls_enabled
from .node.agent import NodeAgent
from .node.cores import CorePool
from .server.service import RemapServerFactory
from .settings import Settings, parse_address

log = Logger()


#: node reconnection: the first retry after about RETRY_FIRST s, growing by RETRY_FACTOR to RETRY_MAX
RETRY_FIRST = 0.5
RETRY_FACTOR = 1.6
RETRY_MAX = 30.0


def reconnect_delays(rng: random.Random | None = None) -> Callable[[int], float]:
    """A retry policy for ``ClientService``: exponential backoff with "equal jitter".

    Each delay is drawn between half and all of the backoff step, so a hundred nodes that lost
    the same server spread their reconnects out instead of arriving in one burst; rounded to
    0.1 s so the "Scheduling retry" log line stays readable.
    """
    draw = (rng or random.SystemRandom()).random

    def delay(attempt: int) -> float:
        step = min(RETRY_MAX, RETRY_FIRST * RETRY_FACTOR ** min(attempt, 64))
        return max(0.1, round(step * (0.5 + 0.5 * draw()), 1))

    return delay


class NamedEndpoint:
    """A client endpoint whose repr is ``tcp:HOST:PORT`` or ``tls:HOST:PORT`` (for log lines)."""

    def __init__(self, inner: Any, name: str) -> None:
        self.inner = inner
        self.name = name

    def connect(self, factory: Any) -> defer.Deferred:
        return self.inner.connect(factory)

    def __repr__(self) -> str:
        return self.name


def default_cores() -> int:
    """A node's default: every CPU but one, left for the machine's owner and the node itself."""
    return max(1, (os.cpu_count() or 2) - 1)


def embedded_cores() -> int:
    """The embedded cluster's default: every CPU, like multiprocessing.Pool and loky (its server
    and node cost little CPU, and on a 2-CPU laptop cpu - 1 would mean no speed-up at all)."""
    return max(1, os.cpu_count() or 1)


@dataclass
class RunningServer:
    factory: RemapServerFactory
    port: Any
    host: str

    @property
    def address(self) -> str:
        port = self.port.getHost().port
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def scheduler(self) -> Any:
        return self.factory.scheduler

    def stop(self) -> defer.Deferred:
        for link in list(self.factory.consoles):
            link.abort()
        for node in list(self.factory.scheduler.nodes.values()):
            node.link.abort()
        self.factory.scheduler.stop()
        self.factory.drivers.stop()
        return defer.maybeDeferred(self.port.stopListening)


async def start_server(
    reactor: Any, settings: Settings, *, secret: bytes | None = None
) -> RunningServer:
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
    )
    try:
        port = await server_endpoint(reactor, settings, settings.host, settings.port).listen(
            factory
        )
    except Exception as exc:  # CannotListenError and friends: say which address, plainly
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
    from .data.layout import DataDir
    from .server.drivers import Drivers, child_env, dial_host

    factory.use_drivers(
        Drivers(
            reactor,
            factory.scheduler,
            data_dir=DataDir.from_setting(settings.data_dir).root,
            cluster_address=f"{dial_host(settings.host)}:{port.getHost().port}",
            child_env=child_env(settings, key),
        )
    )
    return RunningServer(factory, port, settings.host)


@dataclass
class RunningNode:
    service: ClientService | None  # None for the embedded cluster's in-process node
    pool: CorePool
    agent: NodeAgent

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stopService()
        await self.pool.stop()


def start_node(
    reactor: Any,
    settings: Settings,
    *,
    secret: bytes | None = None,
    on_shutdown: Any = None,
    on_auth_failure: Any = None,
    data: DataDirReport | None = None,
) -> RunningNode:
    """Start cores and keep a connection to the server, reconnecting with backoff and jitter."""
    host, port = parse_address(settings.server or f"127.0.0.1:{settings.port}")
    key = secret or client_secret(settings)
    pool = CorePool(reactor, settings.cores or default_cores(), lambda r: None, lambda r: None)
    agent = NodeAgent(
        pool,
        group=settings.group,
        host=settings.node_name,
        on_shutdown=on_shutdown,
        on_auth_failure=on_auth_failure,
        data=data,
    )
    factory = PeerFactory(reactor, "node", key, agent, settings, name=agent.host)
    scheme = "tls" if tls_enabled(settings) else "tcp"
    service = ClientService(
        NamedEndpoint(client_endpoint(reactor, settings, host, port), f"{scheme}:{host}:{port}"),
        factory,
        retryPolicy=reconnect_delays(),
        clock=reactor,
    )
    pool.start()
    service.startService()
    return RunningNode(service, pool, agent)


class EmbeddedCluster:
    """A server and a node inside this process's reactor, cores as child processes.

    Its own node and console join the server over in-process links (no sockets); the server
    also listens on an ephemeral loopback port with a random secret that never leaves the
    process: zero setup, nothing exposed.
    """

    def __init__(self, reactor: Any, settings: Settings, cores: int | None = None) -> None:
        self.reactor = reactor
        # text, so a console child (a job submitted over HTTP) can be given it in its environment
        self.secret = secrets.token_urlsafe(32).encode()
        self.settings = replace(
            settings, host="127.0.0.1", port=0, tls_cert=None, tls_key=None, tls_ca=None
        )
        self.cores = cores or settings.cores or embedded_cores()
        self.server: RunningServer | None = None
        self.node: RunningNode | None = None
        self.http: Any = None  # the HTTP API and dashboard, once start_dashboard is called

    async def start(self) -> str:
        """Start the server and the node; the node joins over an in-process link (no sockets)."""
        self.server = await start_server(self.reactor, self.settings, secret=self.secret)
        pool = CorePool(self.reactor, self.cores, lambda r: None, lambda r: None)
        agent = NodeAgent(pool)
        pool.after_read = functools.partial(deliver_now, self.reactor)
        pool.start()
        self.node = RunningNode(None, pool, agent)
        self._node_link = connect_local(
            self.reactor, self.server.factory, agent, "node", agent.host
        )
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
        return self.http.login_url()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.node is not None:
            self._node_link.close()
            await self.node.pool.stop()
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
