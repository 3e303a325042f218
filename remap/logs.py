"""Log observers, set up by entry points only (library code just uses Logger())."""

from __future__ import annotations

import re
import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


#: Twisted's own lines that say nothing an operator needs (the entry point prints the one
#: "listening" line): "RemapServerFactory (TLS) starting on 7878", "Starting factory <...>"
_NOISE = re.compile(r"^(\S+( \(TLS\))? starting on \d+|(Starting|Stopping) factory <.*>)$")


def _not_noise(event: dict) -> PredicateResult:
    if _NOISE.match(formatEvent(event)):
        return PredicateResult.no
    return PredicateResult.maybe


def log_observer(level: str = "info", stream=None) -> FilteringLogObserver:
    """Text lines at ``level`` and above to ``stream`` (stderr), without Twisted's noise."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS.get(level.lower(), LogLevel.info))
    return FilteringLogObserver(textFileLogObserver(stream or sys.stderr), [_not_noise, predicate])


def start_logging(level: str = "info", stream=None) -> None:
    globalLogBeginner.beginLoggingTo([log_observer(level, stream)], redirectStandardIO=False)
