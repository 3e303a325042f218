"""The user's vertex program: the functions of a job module, checked once on the client.

A job module defines ``prepare(line)`` and ``compute(ctx, vertex_id, value, messages)``, and
optionally ``combine(messages)``, ``output(vertex_id, value)`` and ``aggregators`` (a dict of
name → ``"sum"`` | ``"min"`` | ``"max"`` | a two-argument fold). The program is pickled by value
with the worker call, so nodes need no copy of the module.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..errors import ConfigError, misspelt

FOLDS: dict[str, Callable[[Any, Any], Any]] = {"sum": operator.add, "min": min, "max": max}


def default_output(vertex_id: Any, value: Any) -> str:
    """``id<TAB>value``: what a job without an ``output`` function writes per vertex."""
    return f"{vertex_id}\t{value}"


@dataclass(frozen=True)
class Program:
    """The callables of one vertex job, validated; what every worker runs."""

    prepare: Callable[[str], Any]
    compute: Callable[..., Any]
    combine: Callable[[list[Any]], Any] | None = None
    output: Callable[[Any, Any], Any] = default_output
    aggregators: Mapping[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    #: the two-argument form of ``combine`` when it is sum, min or max: folded per message
    fold: Callable[[Any, Any], Any] | None = None


#: combiners known by name (``combine = "sum"``) or as the builtins themselves → (combine, fold)
_COMBINERS: dict[Any, tuple[Callable[..., Any], Callable[[Any, Any], Any]]] = {
    key: (f, FOLDS[f.__name__]) for f in (sum, min, max) for key in (f, f.__name__)
}


def _fold(name: str, spec: Any) -> Callable[[Any, Any], Any]:
    if isinstance(spec, str):
        if spec not in FOLDS:
            raise ConfigError(
                f"aggregator '{name}': unknown fold '{spec}' (use sum, min, max or a function)"
            )
        return FOLDS[spec]
    if callable(spec):
        return spec
    raise ConfigError(f"aggregator '{name}': fold must be sum, min, max or a function")


def program_from_namespace(ns: Mapping[str, Any], where: str) -> Program:
    """Build a :class:`Program` from a module's names; errors say what is missing and where."""
    if not isinstance(ns, Mapping):  # cluster.vertex("job.py", ...): one line, as mapreduce's
        raise TypeError("give the job's functions as a module or a dict of role -> function")
    for required in ("prepare", "compute"):
        if not callable(ns.get(required)):
            hint = misspelt(required, ns, ("prepare", "compute", "combine", "output"))
            raise ConfigError(f"{where}: a vertex job module must define {required}(){hint}")
    combine = ns.get("combine")
    fold = None
    if isinstance(combine, str) or combine in (sum, min, max):
        if combine not in _COMBINERS:
            raise ConfigError(f"{where}: combine must be sum, min, max or a function")
        combine, fold = _COMBINERS[combine]
    for name, value in (("combine", combine), ("output", ns.get("output"))):
        if value is not None and not callable(value):
            raise ConfigError(f"{where}: '{name}' must be a function")
    aggs = ns.get("aggregators") or {}
    if not isinstance(aggs, Mapping):
        raise ConfigError(f"{where}: 'aggregators' must be a dict of name: fold")
    return Program(
        prepare=ns["prepare"],
        compute=ns["compute"],
        combine=combine,
        output=ns.get("output") or default_output,
        aggregators={str(k): _fold(str(k), v) for k, v in aggs.items()},
        fold=fold,
    )


def program_from_module(module: ModuleType) -> Program:
    return program_from_namespace(
        vars(module), getattr(module, "__file__", None) or module.__name__
    )
