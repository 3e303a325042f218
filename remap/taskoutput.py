"""What tasks print or log, on its way to the person who ran them.

Cores capture a batch's stdout, stderr and ``logging`` output; the node puts its name and
the core's number before each line; the client shows it (``REMAP_TASK_OUTPUT`` switches
it off). Writing to a terminal or pipe may block, so it never happens on the reactor
thread: the reactor hands text to a printer thread.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

#: seconds the process's exit waits for task output still queued
EXIT_FLUSH_TIMEOUT = 2.0


def prefix_lines(text: str, prefix: str) -> str:
    """Put ``prefix`` before every line of a task's output, so the caller sees where it ran."""
    if not text:
        return text
    lines = text.splitlines(keepends=True)
    if not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(prefix + line for line in lines)


class OutputPrinter:
    """Writes task output to a stream (default: the current ``sys.stderr``) on its own thread.

    :meth:`put` may be called from any thread, the reactor's included: it only queues.
    """

    def __init__(self, stream: Callable[[], Any] = lambda: sys.stderr) -> None:
        self.stream = stream
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def put(self, index: int, text: str) -> None:
        if not text:
            return
        with self._idle:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="remap-output", daemon=True)
                self._thread.start()
                atexit.register(self.flush, EXIT_FLUSH_TIMEOUT)  # a script's last lines too
            self._pending += 1
        self._queue.put(text)

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            try:
                out = self.stream()
                out.write(text)
                out.flush()
            except (OSError, ValueError):  # the stream was closed: the output has nowhere to go
                pass
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was written; False if ``timeout`` passed first."""
        if not self._pending:  # the common case, without the lock
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


#: the process's printer for the Python API's task output
printer = OutputPrinter()
