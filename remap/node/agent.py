"""The node's side of its connection to the server."""

from __future__ import annotations

import functools
import os
import pkgutil
import socket
import sys
from typing import Any

from twisted.logger import Logger

from protocol import Authenticated, ServerBusy
from protocol import messages as m
from protocol.framing import Frame, frame_length

from ..data.layout import DataDirReport
from ..dial import not_remap
from ..errors import CertificateMismatch, HandshakeTimeout, RemapError
from ..wire import PeerProtocol
from .cores import CorePool


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


@functools.cache
def importable_names() -> list[str]:
    """Top-level modules this node's Python can import (for jobs' ``requires:``), found once."""
    names = {name for _, name, _ in pkgutil.iter_modules()} | set(sys.builtin_module_names)
    return sorted(names)


class NodeAgent:
    """Handler for the node's connection; the pool outlives reconnections."""

    log = Logger()

    def __init__(
        self,
        pool: CorePool,
        *,
        group: str | None = None,
        host: str | None = None,
        on_shutdown: Any = None,
        on_auth_failure: Any = None,
        data: DataDirReport | None = None,
    ) -> None:
        self.pool = pool
        #: the data directory this node reported (None: it says nothing, never left out)
        self.data = data
        self.group = group
        self.host = host or socket.gethostname()
        self.link: PeerProtocol | None = None
        self._max_frame = 0
        self.on_shutdown = on_shutdown
        self.on_auth_failure = on_auth_failure
        #: set when the node stops: its connection's end is then no loss (nothing reconnects)
        self.stopping = False
        pool.on_result = self._send
        pool.on_failed = self._send
        pool.name = self.host

    def leave(self, reason: str = "stopping") -> None:
        """This node is stopping as asked: say ``goodbye``, so neither side takes the end of the
        connection for a loss."""
        self.stopping = True
        link = self.link
        if link is not None:
            link.send(m.Goodbye(reason=reason))

    def _send(self, msg: m.Message) -> None:
        link = self.link
        if link is None:
            return
        if type(msg) is m.TaskResult and 2 * len(msg.payload) > self._max_frame:
            msg = self._fits(msg, self._max_frame)
        link.send(msg)

    def _forward(self, msg: m.TaskResult, frame: Frame) -> None:
        """A core's result as the core framed it (decoded and checked by the pool already)."""
        link = self.link
        if link is None:
            return
        if 2 * len(msg.payload) > self._max_frame:
            self._send(msg)  # may be too large: checked and reported there
            return
        link.send_encoded(frame[0], frame[1])

    @staticmethod
    def _fits(msg: m.TaskResult, limit: int) -> m.Message:
        """A result frame over the limit would get this node disconnected and the batch re-run
        forever: report it, so the server retries its arguments alone."""
        size = frame_length(*m.encode(msg))  # what the server holds against its limit
        if size <= limit:
            return msg
        return m.TaskFailed(
            task=msg.task,
            reason="too-large",
            at=-1,
            message=f"{size} bytes of results, over REMAP_MAX_FRAME ({limit})",
        )

    # ---------------------------------------------------------------- Handler

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None:
        self.link = link
        #: the largest frame the server takes (fixed once authenticated; read on every result)
        self._max_frame = link.conn.max_frame
        # over a network connection a core's result leaves as the core framed it
        self.pool.on_result_frame = self._forward if isinstance(link, PeerProtocol) else None
        self.log.info("connected to server {peer} (session {s})", peer=link.peer, s=event.session)
        link.send(
            m.NodeInfo(
                host=self.host,
                pid=os.getpid(),
                cores=self.pool.size,
                memory=total_memory(),
                group=self.group,
                load=load_average(),
                modules=importable_names(),
                data_dir=self.data.path if self.data else None,
                data_id=self.data.token if self.data else None,
                data_error=self.data.error if self.data else None,
            )
        )

    def message_received(self, link: PeerProtocol, msg: m.Message) -> None:
        t = type(msg)
        if t is m.Task:
            self.pool.submit(msg)
        elif t is m.JobLoad:
            self.pool.load_job(msg)
        elif t is m.Cancel:
            self.pool.cancel_job(msg.job)
        elif t is m.JobDrop:
            self.pool.drop_job(msg.job)
        elif t is m.Heartbeat:
            pass
        elif t is m.Shutdown:
            self.log.info("server asked this node to stop: {reason}", reason=msg.reason)
            if self.on_shutdown is not None:
                self.on_shutdown(msg.reason)
        elif t is m.Error:
            self.log.warn("server error: {message}", message=msg.message)
        else:
            link.send(m.Error(code="unexpected", message=f"a node does not expect {msg.TYPE}"))

    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None:
        if isinstance(error, ServerBusy):  # its connection caps are full: a retry may get in
            self.log.warn(
                "the server at {peer} refused the connection: {why}; trying again",
                peer=link.peer,
                why=getattr(error, "peer_message", "") or str(error),
            )
            return
        if link.open:  # not refused: connection_lost says the server was lost, and why
            return
        if isinstance(error, HandshakeTimeout):  # silent: not a remap server (its HTTP port?)
            self.log.warn("{why} (trying again)", why=not_remap(link.peer, error))
        else:
            self.log.error("connection to server refused: {error}", error=error)
        if self.on_auth_failure is not None:
            self.on_auth_failure(error)

    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None:
        if isinstance(error, CertificateMismatch):  # a configuration error, like a wrong secret
            self.connection_failed(link, error)
        if self.link is link:
            self.link = None
            if self.stopping:  # the cores are being stopped too: nothing to drop
                self.log.info("left server {peer}: this node is stopping", peer=link.peer)
                return
            self.log.warn(
                "lost the server: {error}; dropping its work and reconnecting", error=error
            )
            self.pool.cancel_all()
        elif not self.stopping and link.failure is None:
            # lost before it authenticated, not refused (a plain node at a TLS server): say why,
            # or its log says only "Scheduling retry"
            self.log.warn(
                "could not join the server at {peer}: {error}; trying again",
                peer=link.peer,
                error=error,
            )

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat(load=load_average(), busy=self.pool.busy)
