"""Transition tables for the state machines (a job's phase on the server, a core's life on a
node): a move the table does not list is a bug, raised at once instead of leaving a half state."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class IllegalTransition(RuntimeError):
    """A state machine was asked for a move its table does not allow (a bug, never a user's)."""


def check_move(what: str, table: Mapping[Enum, frozenset], old: Enum, new: Enum) -> None:
    """Raise :class:`IllegalTransition` unless ``table`` lets ``old`` become ``new``."""
    if new not in table[old]:
        raise IllegalTransition(f"{what}: {old.value} → {new.value} is not a legal move")
