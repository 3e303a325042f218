"""Many simulated nodes in one process, against one real server.

Each simulated node is a real :class:`remap.wire.PeerProtocol` over its own TCP
connection (handshake, heartbeats, NodeInfo), but instead of running tasks on cores it
answers each Task at once by echoing the arguments back as results: the job's function
is taken to be the identity, so the console can check every result. Only the server's
scheduling and forwarding are exercised; the cost of the echo lands in this process.

Run: ``REMAP_SECRET_KEY=... python bench/sim_nodes.py --server 127.0.0.1:PORT --nodes 500``.
Prints ``ready N`` on stdout once every node is authenticated; exits on SIGTERM or when
stdin closes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, stdio, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402

from protocol import Connection  # noqa: E402
from protocol import messages as m
from remap.server.service import MAX_HANDSHAKING_PER_HOST  # noqa: E402
from remap.wire import PeerProtocol  # noqa: E402


class EchoNode:
    """Handler of one simulated node: reports ``cores`` and echoes every task's arguments."""

    def __init__(self, index: int, cores: int, ready: defer.Deferred) -> None:
        self.index = index
        self.cores = cores
        self.ready = ready
        self.tasks = 0

    def authenticated(self, link: PeerProtocol, event: Any) -> None:
        link.send(m.NodeInfo(host=f"sim-{self.index}", pid=os.getpid(), cores=self.cores, memory=0))
        if not self.ready.called:
            self.ready.callback(link)

    def message_received(self, link: PeerProtocol, msg: m.Message) -> None:
        if type(msg) is m.Task:
            self.tasks += 1
            link.send(
                m.TaskResult(
                    task=msg.task,
                    sizes=list(msg.sizes),
                    elapsed=1e-6 * len(msg.sizes),
                    payload=msg.payload,
                )
            )

    def connection_failed(self, link: PeerProtocol, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)

    def connection_lost(self, link: PeerProtocol, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat()


class _StdinWatch(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    secret = os.environ["REMAP_SECRET_KEY"].encode()
    host, port = args.server.rsplit(":", 1)
    endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=30)
    links = []
    # a few at a time: the listen backlog is finite, and the server lets at most
    # MAX_HANDSHAKING_PER_HOST connections from one address be in the handshake at once
    batch = MAX_HANDSHAKING_PER_HOST
    for start in range(0, args.nodes, batch):
        waits = []
        for i in range(start, min(args.nodes, start + batch)):
            ready: defer.Deferred = defer.Deferred()
            proto = PeerProtocol(
                Connection("node", secret),
                EchoNode(i, args.cores, ready),
                reactor,
                handshake_timeout=30,
            )
            await connectProtocol(endpoint, proto)
            waits.append(ready)
        links += await defer.gatherResults(waits, consumeErrors=True)
    print(f"ready {len(links)}", flush=True)
    done: defer.Deferred = defer.Deferred()
    stdio.StandardIO(_StdinWatch(done), reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: done.called or done.callback(None))
    await done
    for link in links:
        link.abort()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--cores", type=int, default=1)
    ns = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(main(r, ns)))
