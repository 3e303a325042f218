"""``kind: vertex`` job files: the vertex keys (the rest is :mod:`remap.jobfile`'s), and a
validated file turned into a program and a :class:`~.driver.VertexConfig`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..data.inputs import resolve_inputs
from ..data.jobspec import MAPREDUCE_FIELDS, SHARED_KEYS, FileJobSpec, count
from ..data.layout import output_taken
from ..errors import ConfigError
from . import DEFAULT_MAX_SUPERSTEPS
from .driver import VertexConfig
from .program import Program, program_from_module

#: keys function jobs also have, with the same meaning (no ``timeout``: a worker runs all job)
VERTEX_SHARED_KEYS: frozenset[str] = SHARED_KEYS - {"timeout"}


@dataclass(frozen=True)
class VertexSpec(FileJobSpec):
    """A validated ``kind: vertex`` job file."""

    partitions: int | None = None  # None: auto, one per worker
    max_supersteps: int = DEFAULT_MAX_SUPERSTEPS
    checkpoint_every: int = 0
    on_error: str = "fail"
    retries: int = 3
    group: str | None = None
    priority: int = 0

    kind = "vertex"

    @staticmethod
    def own(values: Mapping[str, Any]) -> dict[str, Any]:
        return {k: values[k] for k in _OWN_KEYS if k in values}


#: the keys a spec takes as the file gives them (else the defaults above)
_OWN_KEYS = "partitions max_supersteps checkpoint_every on_error retries group priority".split()


def _partitions(entry: Any) -> int | None:
    if entry.value == "auto":
        return None
    return count(1, "an integer >= 1 or auto")(entry)


#: the vertex job's own keys -> validator (jobfile merges them into its table)
VERTEX_FIELDS: dict[str, Callable[[Any], Any]] = {
    "module": MAPREDUCE_FIELDS["module"],
    "input": MAPREDUCE_FIELDS["input"],
    "partitions": _partitions,
    "max_supersteps": count(1, "an integer >= 1"),
    "checkpoint_every": count(0, "an integer >= 0 (0: no checkpoints)"),
}


def to_run(spec: VertexSpec) -> tuple[Program, VertexConfig]:
    """Import the module and build the program and config; errors name file:line:key."""
    from ..bundle import make_importable
    from ..jobfile import load_module

    if spec.modules:  # the job's module may import them (they travel: see shipped_with)
        make_importable(spec.modules, spec.base_dir)
    with spec.blaming("module"):
        module, _ = load_module(spec.module, spec.base_dir)
        program = program_from_module(module)
    if taken := output_taken(spec.output, "vertex"):
        raise ConfigError(f"{spec.where('output')}: {taken}")
    with spec.blaming("input"):
        inputs = resolve_inputs(spec.inputs, spec.base_dir)  # fails before a cluster starts
    config = VertexConfig(
        input=inputs,
        output=spec.output,
        partitions=spec.partitions,
        max_supersteps=spec.max_supersteps,
        checkpoint_every=spec.checkpoint_every,
        on_error=spec.on_error,
        name=spec.name,
    )
    return program, config
