"""A Twisted reactor on a background thread, for synchronous callers (console shell, Python API).

User code and blocking I/O stay on the caller's thread; networking stays on the reactor's.

The runtime drives a reactor instance of its own, never the global
``twisted.internet.reactor``: that one stays free for whoever else runs it on their own
thread (a Twisted application, pytest-twisted's greenlet).

Child processes (embedded cores) are reaped on SIGCHLD (a handler installed when on the main
thread, chaining the one it replaced) and by a periodic reap, for a signal someone else's
handler took; only this reactor reaps them (``_OwnChildren``).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

_lock = threading.Lock()
_thread: threading.Thread | None = None
_reactor: Any = None
#: seconds between reaps that do not wait for SIGCHLD
REAP_INTERVAL = 0.25
#: seconds a thread that ran the loop while it waited (``drive``) keeps it for its next call
KEEP = 0.005
_MAIN = threading.main_thread().ident
#: bumped in a child process after fork(): handles opened before it belong to the parent
generation = 0


def _after_fork_in_child() -> None:
    """A forked child has the parent's reactor object but not its thread: start afresh."""
    global _lock, _thread, _reactor, generation, _MAIN
    _lock = threading.Lock()
    _MAIN = threading.main_thread().ident
    _thread = None
    _reactor = None
    generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _lean_epoll_reactor() -> Any:
    """Twisted's epoll reactor, handing each ready descriptor to its handler directly.

    Twisted wraps every read in ``log.callWithLogger`` (~9 Python calls an event) for a legacy
    log context ``twisted.logger`` never reads; an error escaping a handler is still logged.
    """
    import errno
    import sys
    from _signal import SIGINT
    from _signal import getsignal as _getsignal
    from _signal import signal as _setsignal
    from select import EPOLLIN
    from threading import get_ident
    from time import monotonic as _monotonic

    from twisted.internet._signals import _UnixWaker
    from twisted.internet.epollreactor import EPollReactor
    from twisted.logger import Logger, LogLevel
    from twisted.python import log

    failures = Logger(namespace="twisted.internet.base")

    class LeanWaker(_UnixWaker):
        """Twisted's self-pipe waker, emptied in one call (its ``doRead`` takes four)."""

        def doRead(self) -> None:
            try:
                os.read(self.i, 8192)
            except (BlockingIOError, InterruptedError):
                pass

    class LeanEPollReactor(EPollReactor):
        def __init__(self) -> None:
            #: run once each, right before the reactor next sleeps (:func:`before_sleep`)
            self.before_sleep: list[Callable[[], None]] = []
            #: who runs the loop (see :meth:`drive`): None, the reactor's own thread; else
            #: the ident of a thread that borrowed it, inside :meth:`drive` while ``driving``
            self.driver: int | None = None
            self.driving = False
            self._baton_lock = threading.Lock()
            self._baton = threading.Condition(self._baton_lock)
            self._interrupted: list[Any] = []  # SIGINT frames held while a caller drives
            self._asked: int | None = None  # a thread asked the reactor's thread to park
            self._poked = False  # another thread queued work while the loop is kept idle
            self._left = 0.0  # when the driver last left drive() (monotonic)
            #: threads waiting for a result while another drives: the driver hands back
            self.wanted = 0
            self._park_hook = self._park
            super().__init__()

        def _wakerFactory(self) -> Any:
            return LeanWaker()

        def _run_before_sleep(self) -> None:
            hooks = self.before_sleep.copy()  # the list itself stays: callers hold it
            self.before_sleep.clear()
            park = False
            for hook in hooks:
                if hook == self._park_hook:
                    park = True  # after every other hook: a thread waits for them
                    continue
                try:
                    hook()
                except Exception:
                    failures.failure("a call before the reactor sleeps failed")
            if park:
                self._park()

        # ------------------------------------------------ a waiting thread runs the loop

        def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            self.threadCallQueue.append((f, args, kwargs))
            self.wakeUp()
            if self.driver is not None:
                self.poke()

        def poke(self, by_the_driver_too: bool = True) -> None:
            """Work was queued for the loop: if a thread borrowed it and is back in its own
            code, the reactor's thread takes it back at once. Unless ``by_the_driver_too``,
            work the borrowing thread queues itself is left for it (``thread_caller``'s
            ``quiet``)."""
            with self._baton_lock:
                if (
                    self.driver is not None
                    and not self.driving
                    and (by_the_driver_too or self.driver != get_ident())
                ):
                    self._poked = True
                    self._baton.notify_all()

        def drive(self, until: Callable[[], bool], deadline: float | None) -> bool:
            """Run the loop on the calling thread until ``until()`` or ``deadline``
            (monotonic); False if another thread runs it (then wait for the result as usual,
            and call :meth:`unwant` after).

            The waiting thread reads its answer itself (a wake-up by the reactor's thread costs
            ~40-100 µs a call) while the reactor's thread parks (:meth:`_park`): the loop still
            runs on one thread at a time. The caller keeps the loop for its next call until it
            was idle ``KEEP`` seconds, or other work or another waiting thread wants it. On the
            main thread SIGINT is held while the loop runs (not to leave a handler half done)
            and raised once out of it.
            """
            me, lock, interrupted = get_ident(), self._baton_lock, self._interrupted
            previous = None
            try:  # whatever interrupts this thread, the finally gives the loop up
                if not self._borrow(me, deadline):
                    return False
                if me == _MAIN:
                    previous = _getsignal(SIGINT)
                    if callable(previous):
                        _setsignal(SIGINT, self._hold)  # a SIGINT from now on is held
                    else:
                        previous = None  # ignored, or the default (the process ends): as it was
                self._drive(until, deadline, interrupted)
            finally:
                with lock:
                    if self.driver == me and self.driving:
                        self.driving = False
                        self._left = _monotonic()
                        if self.wanted or self._poked or self.threadCallQueue or not self._started:
                            self.driver = None  # hand the loop back now
                            self._baton.notify_all()
                if previous is not None:
                    _setsignal(SIGINT, previous)
                    if interrupted:
                        frame = interrupted.pop()
                        interrupted.clear()
                        previous(SIGINT, frame)
            return True

        def _borrow(self, me: int, deadline: float | None) -> bool:
            """Take the loop if it is kept idle, else ask the reactor's thread to park and hand
            it over; False if another thread runs it or asked first (this one is then counted
            as waiting)."""
            with self._baton_lock:
                if self.driver is not None and not self.driving:
                    # kept idle, by this thread or another: take it; what poked the reactor's
                    # thread is run here
                    self.driver, self.driving, self._poked = me, True, False
                    return True
                if self.driver is None and self._asked is None and self._started:
                    self._asked = me
                    self.threadCallQueue.append((self.before_sleep.append, (self._park_hook,), {}))
                    self.wakeUp()
                    while self._asked == me and self._started:
                        wait = KEEP if deadline is None else min(KEEP, deadline - _monotonic())
                        if wait <= 0:
                            break  # parked later, it takes the loop back after KEEP
                        self._baton.wait(wait)
                    if self.driver == me:
                        self.driving = True
                        return True
                self.wanted += 1
                return False

        def unwant(self) -> None:
            """A thread that :meth:`drive` turned away has its result (or gave up)."""
            with self._baton_lock:
                self.wanted -= 1

        def _hold(self, signum: int, frame: Any) -> None:
            """SIGINT while a caller runs the loop: stop the loop, then raise (see drive)."""
            self._interrupted.append(frame)
            self.wakeUp()

        def _drive(
            self, until: Callable[[], bool], deadline: float | None, interrupted: list[Any]
        ) -> None:
            """:meth:`mainLoop`'s turns on the calling thread, until ``until()``."""
            while not until() and not interrupted and self._started:
                try:
                    timeout = self._due()
                    if until():
                        break
                    if deadline is not None:
                        left = deadline - _monotonic()
                        if left <= 0:
                            break
                        timeout = left if timeout is None or left < timeout else timeout
                    self.doPoll(timeout)
                except Exception:
                    failures.failure("Unexpected error in main loop", level=LogLevel.critical)
            if self.before_sleep:
                self._run_before_sleep()  # threads to wake for what this loop did

        def _park(self) -> None:
            """Reactor thread: hand the loop to the thread that asked (:meth:`drive`) until it
            hands it back, keeps it idle ``KEEP`` seconds, or other work comes (:meth:`poke`)."""
            baton = self._baton
            with baton:
                if self._asked is None:
                    return
                self.driver, self._asked = self._asked, None
                self.driving, self._left, self._poked = False, _monotonic(), False
                baton.notify_all()
                while self.driver is not None:
                    baton.wait(KEEP)
                    if (
                        self.driver is not None
                        and not self.driving
                        and (self._poked or _monotonic() - self._left >= KEEP)
                    ):
                        self.driver = None
                self._poked = False
            self.wakeUp()  # timers added meanwhile: the next epoll must not sleep past them

        def _due(self) -> float | None:
            """A turn's work before it polls: what is due is run (calls from threads, timed
            calls, a stop); the delay to poll for (None: no timed call). A turn with nothing
            due reads the next timed call's delay itself (``runUntilCurrent`` and ``timeout``
            are four Python calls finding nothing, in every process), once: read again, a
            thread switch could make it negative, which epoll_wait takes as "no timeout"."""
            if (
                self.threadCallQueue
                or self._newTimedCalls
                or self._justStopped
                or self._cancellations > 50
                or (
                    (pending := self._pendingTimedCalls)
                    and (delay := pending[0].time - self.seconds()) <= 0
                )
            ):
                self.runUntilCurrent()
                return self.timeout()
            # the delay ``timeout()`` gives (at most epoll_wait's longest, as Twisted's)
            return (delay if delay < 2147483 else 2147483) if pending else None

        def mainLoop(self) -> None:
            """Twisted's loop with its error handler around the inner loop, not entered on
            every turn; each turn runs what is due as :meth:`_due` says."""
            while self._started:
                try:
                    while self._started:
                        timeout = self._due()
                        self.doIteration(self.running and timeout)
                except BaseException:
                    failures.failure("Unexpected error in main loop", level=LogLevel.critical)
            self._run_before_sleep()  # nothing may wait for a wake-up that never comes
            failures.info("Main loop terminated.")

        def doPoll(self, timeout: float | None) -> None:
            if self.before_sleep:
                self._run_before_sleep()
            if timeout is None:
                timeout = -1
            try:
                ready = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            handle, selectables = self._doReadOrWrite, self._selectables
            for fd, event in ready:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                try:
                    if event == EPOLLIN:
                        # bytes to read, the event of every message: _doReadOrWrite's work
                        # without its mask tests (a descriptor gone takes its way)
                        try:
                            gone = selectable.fileno() == -1
                            why = None if gone else selectable.doRead()
                        except BaseException:
                            gone, why = False, sys.exc_info()[1]
                            log.err()
                        if gone:
                            handle(selectable, fd, event)
                        elif why:
                            self._disconnectSelectable(selectable, why, True)
                    else:
                        handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(system=selectable.__class__.__name__)

        doIteration = doPoll

    return LeanEPollReactor


def before_sleep(r: Any) -> list[Callable[[], None]] | None:
    """The list of callables ``r`` runs right before it next sleeps, or None (another reactor):
    for waking another thread, which woken earlier would find the GIL held. Reactor thread."""
    return getattr(r, "before_sleep", None)


def _new_reactor() -> Any:
    """A reactor that is not installed as the global one."""
    try:
        factory = _lean_epoll_reactor()
    except ImportError:  # not Linux
        try:
            from twisted.internet.pollreactor import PollReactor as factory
        except ImportError:
            from twisted.internet.selectreactor import SelectReactor as factory
    r = factory()
    # registering our thread as "the" I/O thread is process-global; leave that to the global one
    r._registerAsIOThread = False
    return r


class _OwnChildren:
    """The children spawned on one reactor, reaped by that reactor alone, on its own thread.

    Twisted's process-wide table lets any reactor reap every reactor's children, on its own
    thread (with two reactors, an "Unhandled Error" from ``waitpid(None)``): a child spawned
    here leaves that table for this one at once."""

    def __init__(self, r: Any) -> None:
        from twisted.internet import process

        self.children: dict[int, Any] = {}
        table = process.reapProcessHandlers
        spawn = r.spawnProcess

        def spawn_own(*args: Any, **kwargs: Any) -> Any:
            child = spawn(*args, **kwargs)
            pid = child.pid
            if pid is not None and table.get(pid) is child:  # None: it ended already
                del table[pid]
                self.children[pid] = child
                child.reapProcess = lambda: self.reap_one(child)  # what Twisted calls at EOF
            return child

        r.spawnProcess = spawn_own

    def reap_one(self, child: Any) -> None:
        pid = child.pid
        if pid is None:  # ended already
            return
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone's os.wait(): as Twisted, wait for EOF
            return
        if done:
            del self.children[pid]
            child.processEnded(status)

    def reap(self) -> None:
        for child in list(self.children.values()):
            self.reap_one(child)


def reactor() -> Any:
    """The runtime's reactor (created, not started, on first use)."""
    global _reactor
    with _lock:
        if _reactor is None:
            _reactor = _new_reactor()
            _reactor.remap_children = _OwnChildren(_reactor)
        return _reactor


def ensure_running() -> Any:
    """Start the runtime's reactor on a daemon thread once; return it."""
    global _thread
    r = reactor()
    with _lock:
        if _thread is not None:
            return r
        from twisted.internet.task import LoopingCall

        reap = r.remap_children.reap
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGCHLD)

            def on_sigchld(signum: int, frame: Any) -> None:
                r.callFromThread(reap)
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGCHLD, on_sigchld)
            signal.siginterrupt(signal.SIGCHLD, False)
        reaper = LoopingCall(reap)
        reaper.clock = r
        r.callWhenRunning(reaper.start, REAP_INTERVAL, now=False)
        _thread = threading.Thread(
            target=r.run, kwargs={"installSignalHandlers": False}, name="remap-reactor", daemon=True
        )
        _thread.start()
    return r


#: wakers whose ``o`` is the write end of the reactor's self-pipe (Twisted's and ours)
_SELF_PIPE_WAKERS = frozenset({"_UnixWaker", "LeanWaker"})


def thread_caller(r: Any, through: Callable[..., None] | None = None) -> Callable[..., None]:
    """``r.callFromThread`` for a hot path: the same queue and wake-up pipe, without Twisted's
    waker looking ``os.write`` up through a deprecation proxy (~4 µs a call). ``through``: the
    reactor runs ``through(fn, *args)``. Its ``quiet`` leaves the work for a calling thread that
    keeps the loop (``LeanEPollReactor.drive``) and is about to run it again."""
    queue = r.threadCallQueue
    write = os.write

    def make(by_the_driver_too: bool) -> Callable[..., None]:
        def call_soon(fn: Callable[..., Any], *args: Any) -> None:
            queue.append((through, (fn, *args), {}) if through is not None else (fn, args, {}))
            if getattr(r, "driver", None) is not None:
                r.poke(by_the_driver_too)  # a thread borrowed the loop
            fd = getattr(r.waker, "o", None)  # None: the reactor has not started (it will drain)
            if fd is None or type(r.waker).__name__ not in _SELF_PIPE_WAKERS:
                r.wakeUp()
                return
            while True:
                try:
                    write(fd, b"x")
                    return
                except InterruptedError:
                    continue
                except BlockingIOError:
                    return  # the pipe is full of wake-ups: the reactor is woken already

        return call_soon

    call_soon = make(True)
    call_soon.quiet = make(False)  # type: ignore[attr-defined]
    return call_soon


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
    """Run ``fn`` (sync, a coroutine function, or one returning a Deferred) in the reactor."""
    r = ensure_running()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def start() -> None:
        d = defer.maybeDeferred(fn, *args, **kwargs)  # which fails with what fn raises

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
    check_not_reactor_thread()
    return call(fn, *args, **kwargs).result(timeout)


def check_not_reactor_thread() -> None:
    """Refuse to block the reactor's own thread (reactor code calling a blocking API)."""
    if _thread is not None and threading.current_thread() is _thread:
        raise RuntimeError(
            "remap's blocking API was called on the thread that runs its reactor; "
            "call it from another thread (the reactor would wait for itself forever)"
        )
