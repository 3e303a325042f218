"""A Twisted reactor on a background thread, for synchronous callers (console shell, Python API).

User code and blocking I/O stay on the caller's thread; networking stays on the reactor's.
Child-process reaping needs SIGCHLD, which only the main thread may install, so it is
installed here (when we are on the main thread) and forwarded to the reactor.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

_lock = threading.Lock()
_thread: threading.Thread | None = None


def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


def ensure_running() -> Any:
    """Start the global reactor on a daemon thread once; return it."""
    global _thread
    r = reactor()
    with _lock:
        if _thread is not None or r.running:
            return r
        if threading.current_thread() is threading.main_thread():
            from twisted.internet import process

            def on_sigchld(signum: int, frame: Any) -> None:
                r.callFromThread(process.reapAllProcesses)

            signal.signal(signal.SIGCHLD, on_sigchld)
        _thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False},
                                   name="remap-reactor", daemon=True)
        _thread.start()
    return r


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
    """Run ``fn`` (sync, a coroutine function, or one returning a Deferred) in the reactor."""
    r = ensure_running()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def start() -> None:
        try:
            d = defer.maybeDeferred(fn, *args, **kwargs)
            if isinstance(d.result if d.called else None, defer.Deferred):
                pass
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller's thread
            future.set_exception(exc)
            return

        def done(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        def failed(failure: Any) -> None:
            if not future.done():
                future.set_exception(failure.value)

        d.addCallbacks(done, failed)

    r.callFromThread(start)
    return future


def run(fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """Call in the reactor and wait for the result on this thread."""
    return call(fn, *args, **kwargs).result(timeout)


def as_deferred(fn: Callable[..., Any]) -> Callable[..., defer.Deferred]:
    """Let ``call`` run an ``async def`` by wrapping its coroutine in a Deferred."""

    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.ensureDeferred(fn(*args, **kwargs))

    return wrapper
