"""Assembling the pieces: a server, a node, a console connection, an embedded cluster."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.logger import Logger

from protocol.errors import AuthError, ConfigError, ServerUnreachable, VersionMismatch

from .auth import client_secret, server_secret
from .client import ClusterClient
from .local import connect_local
from .net import AuthWaiter, PeerFactory, client_endpoint, server_endpoint
from .node.agent import NodeAgent
from .node.cores import CorePool
from .server.service import RemapServerFactory
from .settings import Settings, parse_address

log = Logger()


def default_cores() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


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
    )
    try:
        port = await server_endpoint(reactor, settings, settings.host, settings.port).listen(
            factory
        )
    except Exception as exc:  # CannotListenError and friends: say which address, plainly
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
    log.info(
        "remap server listening on {host}:{port}", host=settings.host, port=port.getHost().port
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
) -> RunningNode:
    """Start cores and keep a connection to the server, reconnecting with backoff and jitter."""
    host, port = parse_address(settings.server or f"127.0.0.1:{settings.port}")
    key = secret or client_secret(settings)
    pool = CorePool(reactor, settings.cores or default_cores(), lambda r: None, lambda r: None)
    agent = NodeAgent(
        pool, group=settings.group, on_shutdown=on_shutdown, on_auth_failure=on_auth_failure
    )
    factory = PeerFactory(reactor, "node", key, agent, settings, name=agent.host)
    service = ClientService(
        client_endpoint(reactor, settings, host, port),
        factory,
        retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=1.6, jitter=lambda: 0.5),
        clock=reactor,
    )
    pool.start()
    service.startService()
    return RunningNode(service, pool, agent)


async def connect_console(
    reactor: Any,
    settings: Settings,
    address: str,
    *,
    secret: bytes | None = None,
    timeout: float = 10.0,
) -> ClusterClient:
    """Connect and authenticate; raise one clear RemapError when that is impossible."""
    host, port = parse_address(address)
    key = secret or client_secret(settings)
    client = ClusterClient()
    waiter = AuthWaiter(client)
    factory = PeerFactory(reactor, "console", key, waiter, settings, name="console")
    try:
        await client_endpoint(reactor, settings, host, port, timeout=timeout).connect(factory)
    except Exception as exc:
        raise ServerUnreachable(f"cannot reach the server at {address}: {_reason(exc)}") from None
    try:
        await waiter.ready
    except (AuthError, VersionMismatch):
        raise
    except Exception as exc:
        raise ServerUnreachable(
            f"server at {address} closed the connection during the handshake: {_reason(exc)}"
        ) from None
    return client


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class EmbeddedCluster:
    """A server and a node inside this process's reactor, cores as child processes.

    Its own node and console join the server over in-process links (no sockets); the server
    also listens on an ephemeral loopback port with a random secret that never leaves the
    process: zero setup, nothing exposed.
    """

    def __init__(self, reactor: Any, settings: Settings, cores: int | None = None) -> None:
        self.reactor = reactor
        self.secret = secrets.token_bytes(32)
        self.settings = replace(
            settings, host="127.0.0.1", port=0, tls_cert=None, tls_key=None, tls_ca=None
        )
        self.cores = cores or settings.cores or default_cores()
        self.server: RunningServer | None = None
        self.node: RunningNode | None = None

    async def start(self) -> str:
        """Start the server and the node; the node joins over an in-process link (no sockets)."""
        self.server = await start_server(self.reactor, self.settings, secret=self.secret)
        pool = CorePool(self.reactor, self.cores, lambda r: None, lambda r: None)
        agent = NodeAgent(pool)
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

    async def stop(self) -> None:
        if self.node is not None:
            self._node_link.close()
            await self.node.pool.stop()
        if self.server is not None:
            await self.server.stop()
