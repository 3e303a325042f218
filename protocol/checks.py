"""Checks built from type annotations (plain data only): what a message's or a status
record's field may hold when it arrives from a peer."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any

_INT_ONLY = frozenset({int})


def _int_list(value: Any) -> bool:
    """A list of ints (not bools); ``map(type, ...)`` keeps the scan of long sizes lists in C."""
    return type(value) is list and set(map(type, value)) <= _INT_ONLY


def checker(tp: Any) -> Callable[[Any], bool]:
    """Build a fast isinstance-style check for an annotation (plain data types only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [checker(a) for a in typing.get_args(tp)]
        return lambda v: any(c(v) for c in inner)
    if tp is type(None):
        return lambda v: v is None
    if tp is float:
        return lambda v: type(v) in (float, int)
    if tp is int:
        return lambda v: type(v) is int
    if tp in (str, bytes, bool):
        return lambda v, t=tp: type(v) is t
    if tp is Any:
        return lambda v: True
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if arg is int:
            return _int_list
        if arg is Any:
            return lambda v: type(v) is list
        inner_check = checker(arg)
        return lambda v: type(v) is list and all(inner_check(x) for x in v)
    if origin is dict or tp is dict:
        return lambda v: type(v) is dict
    raise TypeError(f"unsupported field type {tp!r}")
