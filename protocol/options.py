"""A job's options, declared once: the type, its defaults and the one validator.

The job file, the Python API, the ``submit`` message (a :class:`JobOptions` plus a request id,
a count and the function) and the scheduler all hold this type, so a value is judged the same
way wherever it comes from: construction checks every field, then the rules between fields,
and raises :class:`InvalidOption` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import InvalidOption


class ResponseMode(str, Enum):
    """Where a job's results go on the console's side."""

    OBJECT = "object"
    STREAM = "stream"
    SQLITE = "sqlite"
    FILE = "file"
    REDUCE = "reduce"
    NONE = "none"

    __str__ = str.__str__

    @property
    def writes_output(self) -> bool:
        """The modes that write to ``output`` (and cannot run without it)."""
        return self in (ResponseMode.SQLITE, ResponseMode.FILE)


class OnError(str, Enum):
    """What a task's exception does to its job."""

    FAIL = "fail"
    CONTINUE = "continue"

    __str__ = str.__str__


def show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling), short enough for one error line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        value = value.value
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Bad(Exception):
    """A rule's verdict on one value (turned into InvalidOption with the key)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected text, got {show(value)}")
    if not value.strip():
        raise _Bad("must not be empty")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {show(value)}")
    return value


def _whole(least: float, what: str) -> Callable[[Any], int]:
    """The rule of an integer option of at least ``least``, ``what`` saying so in its error."""

    def check(value: Any) -> int:
        if not _is_int(value) or value < least:
            raise _Bad(f"expected {what}, got {show(value)}")
        return value

    return check


_integer = _whole(-math.inf, "an integer")
_retries = _whole(0, "an integer >= 0")
_cores = _whole(0, "a number of cores >= 0 (0: no limit)")


def _chunksize(value: Any) -> int | None:
    if value is None or value == "auto":
        return None
    if not _is_int(value) or value < 1:
        raise _Bad(f"expected 'auto' or an integer >= 1, got {show(value)}")
    return value


def _seconds(value: Any, *, zero: bool = False) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        raise _Bad(f"expected a number of seconds {'>=' if zero else '>'} 0, got {show(value)}")
    return float(value)


def _choice(kind: type[Enum]) -> Callable[[Any], Any]:
    names = tuple(member.value for member in kind)

    def check(value: Any) -> Any:
        if isinstance(value, kind):
            return value
        if not isinstance(value, str) or value not in names:
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _Bad(f"expected one of {', '.join(names)}, got {show(value)}{hint}")
        return kind(value)

    return check


def _module_names(value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(
        isinstance(v, str) and v.strip() for v in names
    ):
        raise _Bad(f"expected a list of names, got {show(value)}")
    names = [v.strip() for v in names]
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise _Bad(f"{name!r} is not a module name (like numpy or scipy.signal)")
    return tuple(names)


def _option(default: Any, rule: Callable[[Any], Any], doc: str) -> Any:
    return field(default=default, metadata={"rule": rule, "doc": doc})


def _judge(option: dataclasses.Field, value: Any) -> Any:
    try:
        return option.metadata["rule"](value)
    except _Bad as bad:
        raise InvalidOption(option.name, str(bad)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions:
    """Everything about a job except its function and its arguments."""

    name: str = _option("job", _text, "shown in status and logs")
    mode: ResponseMode = _option(ResponseMode.OBJECT, _choice(ResponseMode), "where results go")
    group: str | None = _option(None, _optional_text, "run only on nodes of this group")
    retries: int = _option(3, _retries, "re-runs of a batch whose core crashed or timed out")
    timeout: float | None = _option(None, _seconds, "seconds one call may take")
    on_error: OnError = _option(OnError.FAIL, _choice(OnError), "what a task's exception does")
    chunksize: int | None = _option(None, _chunksize, "arguments per batch (None: the server's)")
    priority: int = _option(0, _integer, "share weight 2**priority among running jobs")
    max_cores: int = _option(0, _cores, "at most this many tasks in flight (0: no cap)")
    min_cores: int = _option(0, _cores, "served before weights until this many are in flight")
    detach: bool = _option(False, _flag, "keep running after the console goes; attach later")
    star: bool = _option(False, _flag, "call fn(*argument) (or fn(**argument))")
    wait_for_nodes: float | None = _option(
        None, lambda v: _seconds(v, zero=True), "how long to wait for a node that can run it"
    )
    output: str | None = _option(None, _optional_text, "the file the sqlite and file modes write")
    gang: bool = _option(False, _flag, "each call at once on a core of its own (vertex workers)")
    requires: tuple[str, ...] = _option((), _module_names, "modules a node must have")
    data_dir: str | None = _option(None, _optional_text, "a file job's data directory ...")
    data_id: str | None = _option(None, _optional_text, "... and its token: nodes must see both")

    def __post_init__(self) -> None:
        # a field left at its default (the very object) is valid as it is: only the others
        # are judged (each job builds options three times; most fields are defaults)
        for name, default, rule in _RULES:
            value = getattr(self, name)
            if value is default:
                continue
            try:
                checked = rule(value)
            except _Bad as bad:
                raise InvalidOption(name, str(bad)) from None
            if checked is not value:
                object.__setattr__(self, name, checked)
        _check_together(self)

    @classmethod
    def of(cls, other: Any) -> JobOptions:
        """The options part of anything that has them (a ``submit`` message, say)."""
        return cls(**JobOptions.fields(other))

    def fields(self) -> dict[str, Any]:
        """Every option by name (the keyword arguments that rebuild this value)."""
        return {f.name: getattr(self, f.name) for f in OPTION_FIELDS}


OPTION_FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(JobOptions)
_RULES = tuple((f.name, f.default, f.metadata["rule"]) for f in OPTION_FIELDS)


def _check_together(options: JobOptions) -> None:
    """The rules between options; each names the key to change."""
    mode = options.mode
    if mode.writes_output and options.output is None:
        raise InvalidOption(
            "mode", f"{mode.value!r} needs key 'output' (where to write the results)"
        )
    if options.output is not None and not mode.writes_output:
        allowed = ", ".join(sorted(m.value for m in ResponseMode if m.writes_output))
        # a stream goes to stdout or a callback: an output file would be silently ignored
        raise InvalidOption(
            "output", f"not used when response_mode is {mode.value!r} (only {allowed})"
        )
    if options.max_cores and options.min_cores > options.max_cores:
        raise InvalidOption(
            "min_cores",
            f"min_cores {options.min_cores} is more than max_cores {options.max_cores}",
        )


def check_option(name: str, value: Any) -> Any:
    """One option's value as the options hold it, or InvalidOption (for callers that know
    where each value was written, like the job file, and want the error there)."""
    for f in OPTION_FIELDS:
        if f.name == name:
            return _judge(f, value)
    raise KeyError(name)


__all__ = [
    "OPTION_FIELDS",
    "InvalidOption",
    "JobOptions",
    "OnError",
    "ResponseMode",
    "check_option",
    "show",
]
