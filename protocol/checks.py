"""Checks built from type annotations (plain data only): what a message's or a status
record's field may hold when it arrives from a peer."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any

#: the classes a value's type may be exactly, checked as ``type(v) is C`` (bool is not an int)
_PLAIN = (int, str, bytes, bool, list, dict)


def _plain_class(tp: Any) -> type | None:
    """The class ``tp``'s check compares a value's type with, when that is the whole check."""
    if tp in _PLAIN:
        return tp
    origin = typing.get_origin(tp)
    if origin is dict or (origin is list and typing.get_args(tp) in ((), (Any,))):
        return origin
    return None


def expression(tp: Any, var: str) -> str | None:
    """The check of an annotation as a Python expression over the variable ``var``, for the
    types a message's fields mostly have (so a generated decoder checks them inline, without
    a call); None for the others (:func:`checker` builds those)."""
    plain = _plain_class(tp)
    if plain is not None:
        return f"type({var}) is {plain.__name__}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [expression(a, var) for a in typing.get_args(tp)]
        return None if None in inner else "(" + " or ".join(inner) + ")"  # type: ignore[arg-type]
    if tp is type(None):
        return f"{var} is None"
    if tp is float:
        return f"type({var}) in (float, int)"
    if origin is list:
        # every item's type in one C pass (``map(type, ...)``): long ``sizes`` lists stay cheap;
        # a list of one (a single call's ``sizes``) is looked at directly, without a set
        item = _plain_class(typing.get_args(tp)[0])
        if item is not None:
            name = item.__name__
            return (
                f"(type({var}) is list and (len({var}) == 1 and type({var}[0]) is {name}"
                f" or set(map(type, {var})) <= _ONLY_{name}))"
            )
    return None


#: what :func:`expression`'s code may name besides builtins
NAMESPACE: dict[str, Any] = {f"_ONLY_{c.__name__}": frozenset({c}) for c in _PLAIN}


def checker(tp: Any) -> Callable[[Any], bool]:
    """Build a fast isinstance-style check for an annotation (plain data types only)."""
    simple = expression(tp, "v")
    if simple is not None:
        return eval(f"lambda v: {simple}", dict(NAMESPACE))  # noqa: S307 - our own source text
    origin = typing.get_origin(tp)
    if origin is list:
        (inner_check,) = map(checker, typing.get_args(tp))
        return lambda v: type(v) is list and all(inner_check(x) for x in v)
    raise TypeError(f"unsupported field type {tp!r}")
