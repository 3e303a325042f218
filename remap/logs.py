"""Log observers, set up by entry points only (library code just uses Logger())."""

from __future__ import annotations

import contextlib
import re
import sys

from twisted.logger import (
    FilteringLogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)

#: Twisted's own lines that say nothing an operator needs (the entry point says "listening"
#: and "stopped" itself): "X (TLS) starting on 7878", "Starting factory <...>", "(TCP Port 7878
#: Closed)", and ClientService's "Scheduling retry N to connect ..." at every attempt (a node
#: says why it cannot reach its server once, until the reason changes)
_NOISE = re.compile(
    r"^(\S+( \(TLS\))? starting on \d+|(Starting|Stopping) factory <.*>|\((TCP|UDP) Port \d+ Closed\)"
    r"|Scheduling retry \d+ to connect .* in [\d.]+ seconds\.)$"
)


def _not_noise(event: dict) -> PredicateResult:
    if _NOISE.match(formatEvent(event)):
        return PredicateResult.no
    return PredicateResult.maybe


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when a line is written: an in-process caller (a
    test, a notebook) may swap and close the one logging began with."""

    def write(self, text: str) -> None:
        stream = sys.stderr or sys.__stderr__
        with contextlib.suppress(ValueError):  # closed: nowhere left to say it
            stream.write(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            (sys.stderr or sys.__stderr__).flush()


def log_observer(
    level: str = "info", stream=None, predicate: LogLevelFilterPredicate | None = None
) -> FilteringLogObserver:
    """Text lines at ``level`` and above to ``stream`` (the current stderr), without noise."""
    predicate = predicate or LogLevelFilterPredicate(defaultLogLevel=_level(level))
    observer = textFileLogObserver(stream or _CurrentStderr())
    return FilteringLogObserver(observer, [_not_noise, predicate])


def _level(name: str) -> LogLevel:
    """Twisted's level of that name (``warning``: warn); info for a name it lacks."""
    name = name.lower()
    try:
        return LogLevel.levelWithName("warn" if name == "warning" else name)
    except InvalidLogLevelError:
        return LogLevel.info


#: the level filter of the one observer this process installed (entry points may run again
#: in one process — tests, a console called from Python — and must not add another)
_installed: LogLevelFilterPredicate | None = None


def start_logging(level: str = "info", stream=None) -> None:
    """Log to stderr at ``level``; a second call only changes the level. What Twisted buffered
    before is dropped: in a process that used remap before (a notebook), it would show old
    errors as this command's."""
    global _installed
    if _installed is not None:
        _installed.defaultLogLevel = _level(level)
        _installed.clearLogLevels()  # the namespace table holds a copy of the default
        return
    _installed = LogLevelFilterPredicate(defaultLogLevel=_level(level))
    observer = log_observer(level, stream, _installed)
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
