"""Wrappers that cores unpickle around a user's function: kept tiny and free of heavy imports.

``Apply`` runs an ``Executor.submit`` call (one argument is ``(args, kwargs)``);
``Initialized`` runs a pool's ``initializer(*initargs)`` once per core process before the
first call that needs it, the way ``multiprocessing.Pool`` runs it once per worker process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

#: how the message of a task whose result could not be pickled begins (the Pool raises
#: ``multiprocessing.pool.MaybeEncodingError`` for those, as multiprocessing does)
UNPICKLABLE_RESULT = "the result could not be pickled: "
#: the attribute of that pickling error holding ``repr(result)`` (shortened)
RESULT_REPR = "remap_result_repr"

#: the attribute marking an exception raised by an initializer (it travels with the exception)
INITIALIZER_FAILED = "remap_initializer_failed"

#: initializer tokens already run in this (core) process
_initialized: set[str] = set()


class Initializer:
    """``initializer(*initargs)``, identified by a token so each core runs it once."""

    __slots__ = ("fn", "args", "token")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...] = (), token: str = "") -> None:
        self.fn = fn  # callable: the Executor checked it before it connected
        self.args = tuple(args)
        self.token = token or uuid.uuid4().hex

    def ensure(self) -> None:
        if self.token not in _initialized:
            try:
                self.fn(*self.args)  # raises into the call that needed it, as a task error
            except BaseException as exc:
                # marked, so an Executor can break as ProcessPoolExecutor does
                setattr(exc, INITIALIZER_FAILED, True)
                raise
            _initialized.add(self.token)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Initializer, (self.fn, self.args, self.token))


class Initialized:
    """``fn`` behind an :class:`Initializer`."""

    __slots__ = ("fn", "init")

    def __init__(self, fn: Callable[..., Any], init: Initializer) -> None:
        self.fn = fn
        self.init = init

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.init.ensure()
        return self.fn(*args, **kwargs)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The user's function, for the names shown in ``status`` (functools' convention)."""
        return self.fn

    def __reduce__(self) -> tuple[Any, ...]:
        return (Initialized, (self.fn, self.init))


class Apply:
    """The job function of submitted calls: one argument is ``(args, kwargs)``."""

    __slots__ = ("fn", "init")

    def __init__(self, fn: Callable[..., Any], init: Initializer | None = None) -> None:
        self.fn = fn
        self.init = init

    def __call__(self, packed: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        if self.init is not None:
            self.init.ensure()
        args, kwargs = packed
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Apply, (self.fn, self.init))
