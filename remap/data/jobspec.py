"""``kind: mapreduce`` job files: their keys, validated as strictly as function jobs'.

The YAML reading, line tracking and shared keys (``output``, ``retries``, ``timeout``,
``on_error``, ``group``, ``name``, ``priority``) are :mod:`remap.jobfile`'s; this module adds
the data job's own keys and turns a validated file into a :class:`~.driver.DataJob`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import Bundle, collect, make_importable
from ..errors import ConfigError
from .driver import DataOptions, job_from_functions
from .inputs import resolve_inputs
from .layout import check_name, output_taken
from .tasks import DEFAULT_PURPOSE

#: keys function jobs also have, with the same meaning
SHARED_KEYS: frozenset[str] = frozenset(
    {"output", "retries", "timeout", "on_error", "group", "name", "priority", "modules", "files"}
)


@dataclass(frozen=True)
class FileJobSpec:
    """What data and vertex job specs share: their files, and errors that name the job file,
    line and key. ``module`` is resolved by :func:`to_job` (the vertex one by ``to_run``)."""

    module: str
    inputs: tuple[str, ...]
    output: Path
    base_dir: Path
    _: KW_ONLY
    name: str = ""
    #: shipped to the nodes as a function job's are (see :mod:`remap.bundle`)
    modules: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    source: str = "<job>"
    key_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, key: str) -> str:
        line = self.key_lines.get(key)
        return f"{self.source}:{line}: key '{key}'" if line else self.source

    @contextmanager
    def blaming(self, key: str) -> Iterator[None]:
        """A ConfigError raised inside names the job file, line and ``key``."""
        try:
            yield
        except ConfigError as exc:
            raise ConfigError(f"{self.where(key)}: {exc}") from exc.__cause__

    @classmethod
    def load(
        cls,
        entries: Mapping[str, Any],
        values: Mapping[str, Any],
        root_line: int,
        base_dir: Path,
        source: str,
    ) -> Any:
        """The spec of a validated job file (called by :func:`remap.jobfile.load_job_text`):
        module, inputs, output (resolved against the job file), name, the ``modules:`` and
        ``files:`` it ships (checked as a function job's), where each key stands, and the fields
        of its kind's own keys (the subclass's ``own``); a missing one is an error."""
        from ..jobfile import _check_shipped, _default_name

        for key in ("module", "input", "output"):
            if key not in values:
                raise ConfigError(
                    f"{source}:{root_line}: key '{key}' is required for kind: {cls.kind}"
                )
        modules, files = _check_shipped(dict(entries), dict(values), base_dir)
        return cls(
            modules=modules,
            files=files,
            module=values["module"],
            inputs=values["input"],
            output=(base_dir / Path(values["output"]).expanduser()).resolve(),
            base_dir=base_dir,
            name=values.get("name") or _default_name(source),
            source=source,
            key_lines={key: entry.key_line for key, entry in entries.items()},
            **cls.own(values),
        )


@dataclass(frozen=True)
class MapReduceSpec(FileJobSpec):
    """A validated ``kind: mapreduce`` job file."""

    reducers: Mapping[str, int] = field(default_factory=lambda: {DEFAULT_PURPOSE: 1})
    options: DataOptions = DataOptions()

    kind = "mapreduce"

    @staticmethod
    def own(values: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "reducers": values.get("reducers", {DEFAULT_PURPOSE: 1}),
            "options": DataOptions(**{k: values[k] for k in _OPTION_KEYS if k in values}),
        }


def _module(entry: Any) -> str:
    value = entry.value
    text = value if isinstance(value, str) else ""
    if not (text.endswith(".py") or all(p.isidentifier() for p in text.split("."))):
        raise entry.fail(f"expected FILE.py or package.module, got {value!r}")
    return value


def _input(entry: Any) -> tuple[str, ...]:
    value = entry.value
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise entry.fail("expected a file, a directory, a glob, or a non-empty list of them")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise entry.fail(f"expected paths or globs as text, got {item!r}")
    return tuple(items)


def _int_at_least(entry: Any, value: Any, minimum: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise entry.fail(f"expected {what}, got {value!r}")
    return value


def count(minimum: int, what: str) -> Callable[[Any], int]:
    """A key whose value is an integer >= ``minimum`` (``what`` says so in the error)."""
    return lambda entry: _int_at_least(entry, entry.value, minimum, what)


def _reducers(entry: Any) -> dict[str, int]:
    value = entry.value
    if isinstance(value, dict):
        if not value:
            raise entry.fail("expected at least one reducer set")
        counts = {}
        for purpose, n in value.items():
            try:
                check_name("purpose", purpose)
            except ConfigError as exc:
                raise entry.fail(str(exc)) from None
            counts[purpose] = _int_at_least(entry, n, 1, f"a reducer count for {purpose!r} >= 1")
        return counts
    return {DEFAULT_PURPOSE: _int_at_least(entry, value, 1, "a reducer count >= 1")}


def _megabytes(entry: Any) -> float:
    value = entry.value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise entry.fail(f"expected a number of megabytes > 0, got {value!r}")
    return float(value)


#: the data job's own keys -> validator (jobfile merges them into its table)
MAPREDUCE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "module": _module,
    "input": _input,
    "reducers": _reducers,
    "split_mb": _megabytes,
    "spill_mb": _megabytes,
    "fanin": count(2, "an integer >= 2"),
}


_OPTION_KEYS = tuple(f.name for f in dataclasses.fields(DataOptions))


def shipped_with(spec: Any) -> Bundle:
    """A data or vertex job file's ``modules:`` and ``files:``, packed as a function job's
    (:func:`remap.bundle.collect`); its modules made importable here too, since the job's
    module may import them. Errors name the job file and key."""
    try:
        if spec.modules:
            make_importable(spec.modules, spec.base_dir)
        return collect(list(spec.modules), list(spec.files), spec.base_dir)
    except ConfigError as exc:
        key = "files" if str(exc).startswith("files:") or not spec.modules else "modules"
        raise ConfigError(f"{spec.where(key)}: {exc}") from None


def to_job(spec: MapReduceSpec) -> Any:
    """Import the module and build the :class:`~.driver.DataJob`; errors name file:line:key."""
    from ..jobfile import load_module

    shipped = shipped_with(spec)
    with spec.blaming("module"):
        module, _ = load_module(spec.module, spec.base_dir)
        job = job_from_functions(
            module,
            spec.inputs,
            spec.output,
            reducers=dict(spec.reducers),
            base_dir=spec.base_dir,
            name=spec.name,
            bundle=shipped,
            **dataclasses.asdict(spec.options),
        )
    # the driver checks these again; here they fail before a cluster starts, naming the key
    if taken := output_taken(spec.output):
        raise ConfigError(f"{spec.where('output')}: {taken}")
    with spec.blaming("input"):
        resolve_inputs(spec.inputs, spec.base_dir)
    return job
