"""Server-sent events: one snapshot per tick, encoded once and written to every viewer.

The number of open dashboards costs one ``write`` each per tick, never a scheduler walk each.
A viewer whose socket is full (its transport paused us) skips ticks instead of buffering them:
every snapshot is complete, so a slow viewer only sees fewer of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

MAX_VIEWERS = 200


def encode(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@implementer(IPushProducer)
class _Viewer:
    def __init__(self, hub: EventHub, request: Any) -> None:
        self.hub = hub
        self.request = request
        self.paused = False

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802
        self.hub.viewers.discard(self)

    def send(self, data: bytes) -> None:
        if not self.paused:
            self.request.write(data)


class EventHub:
    """Ticks on the injected clock: samples throughput always, builds snapshots only if watched."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        build: Callable[[], dict],
        sample: Callable[[], None],
        history: Callable[[], list],
        interval: float = 1.0,
    ) -> None:
        self.clock = clock
        self.build = build
        self.sample = sample
        self.history = history
        self.interval = interval
        self.viewers: set[_Viewer] = set()
        self.snapshots = 0  # how many were built (a test proves one per tick, whoever watches)
        self._last: bytes | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for viewer in list(self.viewers):
            viewer.request.unregisterProducer()
            viewer.request.finish()
        self.viewers.clear()

    def tick(self) -> None:
        self.sample()
        if not self.viewers:
            self._last = None
            return
        try:
            self._last = encode(self.build(), "snapshot")
        except Exception:  # a bug here must not stop the loop for good
            self.log.failure("building the dashboard snapshot failed")
            return
        self.snapshots += 1
        for viewer in list(self.viewers):
            viewer.send(self._last)

    def add(self, request: Any) -> bool:
        """Start streaming to ``request``; False when too many viewers are open."""
        if len(self.viewers) >= MAX_VIEWERS:
            return False
        viewer = _Viewer(self, request)
        self.viewers.add(viewer)
        request.registerProducer(viewer, True)
        request.notifyFinish().addBoth(lambda _: self.viewers.discard(viewer))
        request.write(b"retry: 3000\n\n" + encode(self.history(), "history"))
        if self._last is None:
            self._last = encode(self.build(), "snapshot")
            self.snapshots += 1
        request.write(self._last)
        return True
