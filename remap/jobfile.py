"""Strict loader for YAML job files, and the lazy readers a loaded job needs.

A job file is user input: every mistake must come back as one :class:`ConfigError` line that
names the file, the line and the key, before any work reaches the cluster.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import keyword
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import yaml

from protocol.options import OPTION_FIELDS, JobOptions, ResponseMode, check_option
from protocol.options import show as _show

from .errors import ConfigError, InvalidOption

JOB_KINDS: tuple[str, ...] = ("function", "mapreduce", "vertex")
ARG_SOURCES: tuple[str, ...] = ("args", "args_path", "args_range")
#: job-file keys named differently from the option they set
_OPTION_OF: dict[str, str] = {"response_mode": "mode"}
_KEY_OF: dict[str, str] = {option: key for key, option in _OPTION_OF.items()}

_REF_FORMS = "'FILE.py:NAME' or 'package.module:NAME'"
_YES_NO = " (YAML reads unquoted yes/no/on/off as true/false: quote it)"
_STR_TAG = "tag:yaml.org,2002:str"
_MODULE_PREFIX = "remap_job_"


@dataclass(frozen=True)
class JobSpec:
    """A validated job file; paths are absolute, references are checked for form only.

    ``function`` and ``reduce`` are kept as written so the job can be shown back to the user;
    :func:`load_callables` resolves them. ``source`` and ``key_lines`` exist so errors found
    after loading (a missing function file, say) still name the job file and line.
    """

    function: str
    base_dir: Path
    #: what the server needs (``options.output`` is the absolute path of ``output:``)
    options: JobOptions = JobOptions()
    args: list[Any] | None = None
    args_path: Path | None = None
    args_range: tuple[int, int, int] | None = None
    reduce: str | None = None
    modules: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    source: str = "<job>"
    key_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    kind = "function"

    @property
    def output(self) -> Path | None:
        """The file the sqlite and file modes write (absolute)."""
        return Path(self.options.output) if self.options.output is not None else None


# --- loading -------------------------------------------------------------------------------------


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file; relative paths inside it are relative to its directory."""
    source = str(path)
    file = Path(path).expanduser()
    if file.suffix == ".py" and file.is_file():  # read as YAML, its first line was a "key"
        raise ConfigError(
            f"{source}: is Python, not a job file: write a YAML job file that names it "
            f"(function: {file.name}:NAME, or module: {file.name} for a data or vertex job)"
        )
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: job file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a job file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read job file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}:{line}: job file is not valid UTF-8 text") from None
    return load_job_text(text, file.resolve().parent, source=source)


def load_job_text(text: str, base_dir: Path, source: str = "<job>") -> Any:
    """Validate job-file text; ``source`` is the name errors use, ``base_dir`` anchors paths.

    A function job gives a :class:`JobSpec`; ``kind: mapreduce`` gives the data job's spec
    (:class:`remap.data.jobspec.MapReduceSpec`), ``kind: vertex`` the vertex job's
    (:class:`remap.vertex.jobspec.VertexSpec`).
    """
    from .data.jobspec import MAPREDUCE_FIELDS, SHARED_KEYS, MapReduceSpec
    from .vertex.jobspec import VERTEX_FIELDS, VERTEX_SHARED_KEYS, VertexSpec

    base_dir = Path(base_dir).expanduser().resolve()
    known = {**_FIELDS, **MAPREDUCE_FIELDS, **VERTEX_FIELDS, "kind": _choice(JOB_KINDS)}
    entries, root_line = _read_mapping(text, source, known)
    kind = known["kind"](entries.pop("kind")) if "kind" in entries else "function"
    own = {
        "mapreduce": set(MAPREDUCE_FIELDS) | SHARED_KEYS,
        "vertex": set(VERTEX_FIELDS) | VERTEX_SHARED_KEYS,
    }.get(kind, set(_FIELDS))
    for key, entry in entries.items():
        if key not in own:
            raise entry.fail(f"not used by 'kind: {kind}' jobs", entry.key_line)
    values = {key: known[key](entry) for key, entry in entries.items()}
    if kind in ("mapreduce", "vertex"):
        spec = MapReduceSpec if kind == "mapreduce" else VertexSpec
        return spec.load(entries, values, root_line, base_dir, source)

    if "function" not in values:
        raise ConfigError(f"{source}:{root_line}: key 'function' is required ({_REF_FORMS})")
    _check_sources(entries, values, source, root_line)
    options = job_options(entries, values, base_dir, source, root_line)
    _check_reduce(entries, values, source, options.mode)
    if options.star:
        _check_star(entries, values)

    args_path = None
    if "args_path" in values:
        args_path = _existing_file(entries["args_path"], base_dir, values["args_path"])
    modules, files = _check_shipped(entries, values, base_dir)

    return JobSpec(
        function=values["function"],
        base_dir=base_dir,
        options=options,
        args=values.get("args"),
        args_path=args_path,
        args_range=values.get("args_range"),
        reduce=values.get("reduce"),
        modules=modules,
        files=files,
        source=source,
        key_lines={key: entry.key_line for key, entry in entries.items()},
    )


def job_options(
    entries: dict[str, _Entry], values: dict[str, Any], base_dir: Path, source: str, root_line: int
) -> JobOptions:
    """The job's options, judged by the one validator; an error names the key and its line."""
    given = {_OPTION_OF.get(key, key): value for key, value in values.items()}
    given = {f.name: given[f.name] for f in OPTION_FIELDS if f.name in given}
    if given.get("output") is not None:
        given["output"] = str(_resolve(base_dir, given["output"]))
    given.setdefault("name", _default_name(source))
    try:
        return JobOptions(**given)
    except InvalidOption as exc:  # a rule between keys: point at the key to change
        key = _KEY_OF.get(exc.key, exc.key)
        line = entries[key].key_line if key in entries else root_line
        raise ConfigError(f"{source}:{line}: key '{key}': {exc.problem}") from None


def _check_shipped(
    entries: dict[str, _Entry], values: dict[str, Any], base_dir: Path
) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    """``modules:`` must name files, packages or importable modules; ``files:`` files."""
    from .bundle import module_root

    modules = tuple(values.get("modules", ()))
    for name in modules:
        try:
            module_root(name, base_dir)
        except ConfigError as exc:
            raise entries["modules"].fail(str(exc).removeprefix("modules: ")) from None
    files = []
    for name in values.get("files", ()):
        path = _resolve(base_dir, name)
        if not path.is_file():
            raise entries["files"].fail(f"{name!r}: no such file ({path})")
        if path.name in {f.name for f in files}:
            raise entries["files"].fail(f"two files are named {path.name!r}; names must differ")
        files.append(path)
    return modules, tuple(files)


@dataclass(frozen=True)
class _Entry:
    """One top-level key of a job file, its constructed value and where both were written."""

    source: str
    key: str
    key_line: int
    value_line: int
    value: Any
    node: yaml.Node

    def fail(self, problem: str, line: int | None = None) -> ConfigError:
        """An error about this key, at the value's line unless told otherwise."""
        return ConfigError(f"{self.source}:{line or self.value_line}: key '{self.key}': {problem}")


def _read_mapping(
    text: str, source: str, known: Mapping[str, Any]
) -> tuple[dict[str, _Entry], int]:
    """Parse YAML keeping node marks, so every later error can name its line.

    Returns the entries by key and the mapping's first line (for errors about missing keys).
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigError(f"{source}:1: job file is empty; expected a mapping with 'function'")
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise ConfigError(
                f"{source}:{_line(root)}: expected a mapping of keys to values at the top level, "
                f"got {kind}"
            )
        entries: dict[str, _Entry] = {}
        for key_node, value_node in root.value:
            key_line = _line(key_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                raise ConfigError(f"{source}:{key_line}: key {shown!r}: keys must be plain text")
            key = key_node.value
            if key in entries:
                raise ConfigError(
                    f"{source}:{key_line}: key '{key}': given twice "
                    f"(first on line {entries[key].key_line})"
                )
            if key not in known:
                raise ConfigError(f"{source}:{key_line}: unknown key '{key}'{_suggest(key, known)}")
            value = loader.construct_object(value_node, deep=True)
            entries[key] = _Entry(source, key, key_line, _line(value_node), value, value_node)
        return entries, _line(root)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(yaml_problem(exc, source)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.MarkedYAMLError, source: str) -> str:
    """PyYAML's problem and context, reworded into one line that starts with ``source:line``."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = exc.problem or "unreadable"
    context = exc.context
    if context and exc.context_mark is not None and exc.context_mark is not mark:
        if exc.context_mark.line != mark.line:
            context += f" started on line {exc.context_mark.line + 1}"
    if context and problem.startswith("but "):
        problem = f"{context} {problem}"
    elif context:
        problem = f"{problem} ({context})"
    return f"{where}: invalid YAML: {problem}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; known keys: " + ", ".join(_FIELDS)


def _default_name(source: str) -> str:
    if source.startswith("<") and source.endswith(">"):
        return source[1:-1] or "job"
    return Path(source).stem or "job"


def _resolve(base_dir: Path, text: str) -> Path:
    return (base_dir / Path(text).expanduser()).resolve()


def _existing_file(entry: _Entry, base_dir: Path, text: str) -> Path:
    """Check the argument file now: failing after the job started would waste the cluster."""
    path = _resolve(base_dir, text)
    if not path.exists():
        raise entry.fail(f"file not found: {path}")
    if path.is_dir():
        raise entry.fail(f"is a directory, not a file of arguments: {path}")
    if not os.access(path, os.R_OK):
        raise entry.fail(f"file is not readable: {path}")
    return path


def _check_sources(
    entries: dict[str, _Entry], values: dict[str, Any], source: str, root_line: int
) -> None:
    """Exactly one argument source: two would leave it unclear which arguments run."""
    given = [key for key in ARG_SOURCES if key in values]
    if not given:
        raise ConfigError(
            f"{source}:{root_line}: no argument source: give exactly one of "
            + ", ".join(f"'{key}'" for key in ARG_SOURCES)
        )
    if len(given) > 1:
        last = max(given, key=lambda key: entries[key].key_line)
        raise ConfigError(
            f"{source}:{entries[last].key_line}: keys "
            + ", ".join(f"'{key}'" for key in given)
            + " each give the arguments: keep exactly one of them"
        )


def _check_reduce(
    entries: dict[str, _Entry], values: dict[str, Any], source: str, mode: ResponseMode
) -> None:
    """``reduce`` must be present exactly when the response mode uses it (``output`` is the
    options' own rule)."""
    if mode == "reduce" and "reduce" not in values:
        where = entries["response_mode"]
        raise ConfigError(
            f"{source}:{where.key_line}: key 'response_mode': 'reduce' needs key 'reduce' "
            "(the function that combines two results)"
        )
    if "reduce" in values and mode != "reduce":
        raise ConfigError(
            f"{source}:{entries['reduce'].key_line}: key 'reduce': only used when "
            f"response_mode is 'reduce', not {mode.value!r}"
        )


def _check_star(entries: dict[str, _Entry], values: dict[str, Any]) -> None:
    """``star`` unpacks each argument, so only lists and mappings can be called that way."""
    if "args_range" in values:
        raise entries["star"].fail(
            "cannot unpack the integers of 'args_range'; use 'args' or 'args_path' with "
            "lists or mappings"
        )
    if "args" in values:
        entry = entries["args"]
        for index, (item, node) in enumerate(zip(values["args"], entry.node.value, strict=True)):
            if not isinstance(item, (list, dict)):
                raise entry.fail(
                    f"item {index} must be a list or a mapping because 'star' is true, "
                    f"got {_show(item)}",
                    line=_line(node),
                )


# --- per-key validators --------------------------------------------------------------------------


def _ref_problem(ref: str, *, bare_allowed: bool) -> str | None:
    """Why ``ref`` is not a function reference, or None; checks form only, imports nothing."""
    if bare_allowed and ":" not in ref:
        target, name = "x", ref  # (a bare name: only the name to check)
    elif ref.count(":") != 1:
        forms = _REF_FORMS + (" or a bare NAME" if bare_allowed else "")
        return f"expected {forms} with exactly one ':', got {_show(ref)}"
    else:
        target, _, name = ref.partition(":")
    if not name.isidentifier() or keyword.iskeyword(name):
        return f"expected a Python identifier after ':', got {_show(ref)}"
    if not target:
        return f"expected a file or module before ':', got {_show(ref)}"
    if not target.endswith(".py") and not all(
        part.isidentifier() and not keyword.iskeyword(part) for part in target.split(".")
    ):
        return f"expected {_REF_FORMS}: {target!r} is neither a .py file nor a module name"
    return None


def _text(entry: _Entry) -> str:
    value = entry.value
    if isinstance(value, str):
        return value
    hint = _YES_NO if isinstance(value, bool) else ""
    raise entry.fail(f"expected text, got {_show(value)}{hint}")


def _nonempty_text(entry: _Entry) -> str:
    value = _text(entry)
    if not value.strip():
        raise entry.fail("must not be empty")
    return value


def _ref(bare_allowed: bool) -> Callable[[_Entry], str]:
    """A reference to a function (``reduce`` may also name a built-in fold, bare)."""

    def check(entry: _Entry) -> str:
        value = _text(entry)
        problem = _ref_problem(value, bare_allowed=bare_allowed)
        if problem:
            raise entry.fail(problem)
        return value

    return check


def _text_list(entry: _Entry) -> list[str]:
    value = entry.value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise entry.fail(f"expected a list of names, got {_show(entry.value)}")
    return [v.strip() for v in value]


def _option(name: str) -> Callable[[_Entry], Any]:
    """A key that sets job option ``name``: judged by the options' own rule for it."""

    def check(entry: _Entry) -> Any:
        try:
            return check_option(name, entry.value)
        except InvalidOption as exc:
            yes_no = isinstance(entry.value, bool) and exc.problem.startswith("expected text")
            raise entry.fail(exc.problem + (_YES_NO if yes_no else "")) from None

    return check


def _choice(choices: tuple[str, ...]) -> Callable[[_Entry], str]:
    def check(entry: _Entry) -> str:
        if not isinstance(entry.value, str) or entry.value not in choices:
            close = difflib.get_close_matches(str(entry.value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise entry.fail(
                f"expected one of {', '.join(choices)}, got {_show(entry.value)}{hint}"
            )
        return entry.value

    return check


def _args(entry: _Entry) -> list[Any]:
    if not isinstance(entry.value, list):
        raise entry.fail(f"expected a list of arguments, got {_show(entry.value)}")
    return entry.value


def _args_range(entry: _Entry) -> tuple[int, int, int]:
    value = entry.value
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise entry.fail(
            f"expected [start, stop] or [start, stop, step] of integers, got {_show(value)}"
        )
    for item, node in zip(value, entry.node.value, strict=True):
        if not isinstance(item, int) or isinstance(item, bool):
            raise entry.fail(f"expected integers, got {_show(item)}", line=_line(node))
    start, stop, step = (*value, 1) if len(value) == 2 else value
    if step == 0:
        raise entry.fail("step must not be 0", line=_line(entry.node.value[2]))
    return (start, stop, step)


_FIELDS: dict[str, Callable[[_Entry], Any]] = {
    "function": _ref(bare_allowed=False),
    "args": _args,
    "args_path": _nonempty_text,
    "args_range": _args_range,
    "star": _option("star"),
    "response_mode": _option("mode"),
    "output": _option("output"),
    "reduce": _ref(bare_allowed=True),
    "chunksize": _option("chunksize"),
    "retries": _option("retries"),
    "timeout": _option("timeout"),
    "on_error": _option("on_error"),
    "group": _option("group"),
    "name": _option("name"),
    "priority": _option("priority"),
    "max_cores": _option("max_cores"),
    "min_cores": _option("min_cores"),
    "detach": _option("detach"),
    "modules": _text_list,
    "files": _text_list,
    "requires": _option("requires"),
}

#: every key a job file may contain, in the order the docs list them
JOB_KEYS: tuple[str, ...] = tuple(_FIELDS)


# --- arguments -----------------------------------------------------------------------------------


def iter_arguments(spec: JobSpec, *, max_line: int | None = None) -> Iterator[Any]:
    """Yield the job's arguments one by one; an argument file is streamed, never read whole.

    A line of the argument file longer than ``max_line`` bytes is refused without being
    read into memory (it could not travel in one message anyway).
    """
    if spec.args is not None:
        return iter(spec.args)
    if spec.args_range is not None:
        return iter(range(*spec.args_range))
    if spec.args_path is not None:
        return _iter_json_lines(spec.args_path, star=spec.options.star, max_line=max_line)
    raise ConfigError(f"{spec.source}: no argument source")


def count_arguments(spec: JobSpec) -> int | None:
    """The number of arguments if known without reading a file (for progress), else None."""
    if spec.args is not None:
        return len(spec.args)
    if spec.args_range is not None:
        return len(range(*spec.args_range))
    return None


def _iter_json_lines(path: Path, *, star: bool, max_line: int | None = None) -> Iterator[Any]:
    """One JSON value per line; binary reads keep line numbers exact even for bad UTF-8."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read arguments: {exc.strerror or exc}") from None
    limit = -1 if max_line is None else max_line + 1
    index = 0
    with handle:
        for lineno, raw in enumerate(iter(lambda: handle.readline(limit), b""), start=1):
            if len(raw) == limit and not raw.endswith(b"\n"):
                size = len(raw) + _skip_line(handle)
                raise ConfigError(
                    f"{path}:{lineno}: argument {index} is {size:,} bytes of JSON, over the "
                    f"{max_line:,} bytes an argument may have in one message (REMAP_MAX_FRAME)"
                )
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path}:{lineno}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{lineno}: invalid JSON argument: {exc.msg} (column {exc.colno})"
                ) from None
            if star and not isinstance(value, (list, dict)):
                raise ConfigError(
                    f"{path}:{lineno}: 'star' is true, so each argument must be a list or an "
                    f"object, got {_show(value)}"
                )
            index += 1
            yield value


def _skip_line(handle: Any, block: int = 1 << 20) -> int:
    """Read past the rest of a line in blocks, never holding it whole; return its length."""
    skipped = 0
    while True:
        chunk = handle.readline(block)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped - (1 if chunk.endswith(b"\n") else 0)


# --- callables -----------------------------------------------------------------------------------


def load_callables(spec: JobSpec) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """Resolve the job's function and reducer; errors name the job file, key and line."""
    if spec.modules:  # the function's file may import them: make them importable here too
        from .bundle import make_importable

        make_importable(spec.modules, spec.base_dir)
    function = _resolve_key(spec, "function", spec.function)
    reducer = None
    if spec.reduce is not None:
        ref = spec.reduce
        if ":" not in ref:
            ref = f"{spec.function.rpartition(':')[0]}:{ref}"
        reducer = _resolve_key(spec, "reduce", ref)
    return function, reducer


def _resolve_key(spec: JobSpec, key: str, ref: str) -> Callable[..., Any]:
    try:
        return resolve_function(ref, spec.base_dir)
    except ConfigError as exc:
        line = spec.key_lines.get(key)
        where = f"{spec.source}:{line}" if line else spec.source
        raise ConfigError(f"{where}: key '{key}': {exc}") from exc.__cause__


def resolve_function(ref: str, base_dir: Path) -> Callable[..., Any]:
    """Turn ``FILE.py:NAME`` or ``module:NAME`` into the callable.

    A file is loaded once, under a name derived from its path, and registered with cloudpickle
    so its code ships by value to nodes that do not have the file.
    """
    problem = _ref_problem(ref, bare_allowed=False)
    if problem:
        raise ConfigError(problem)
    target, _, name = ref.partition(":")
    module, where = load_module(target, base_dir)
    try:
        found = getattr(module, name)
    except AttributeError:
        candidates = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{ref}: no name '{name}' in {where}{hint}") from None
    if not callable(found):
        raise ConfigError(
            f"{ref}: '{name}' in {where} is not callable (it is {type(found).__name__})"
        )
    return found


def load_module(target: str, base_dir: Path) -> tuple[ModuleType, str]:
    """A job's ``FILE.py`` (shipped by value) or importable module, and how to name it."""
    if target.endswith(".py"):
        path = _resolve(Path(base_dir), target)
        return _load_file_module(path), str(path)
    return _import_module(target, Path(base_dir)), f"module '{target}'"


def module_name_for(path: Path) -> str:
    """The stable, importable-looking name a job's Python file is loaded under."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:16]
    return _MODULE_PREFIX + digest


def _load_file_module(path: Path) -> ModuleType:
    name = module_name_for(path)
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # user code: report it, do not crash the console
        del sys.modules[name]
        raise _import_error(exc, _where_raised(exc, path)) from exc
    cloudpickle.register_pickle_by_value(module)
    return module


def _import_module(target: str, base_dir: Path) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            top = target.partition(".")[0]
            hint = ""
            if (base_dir / top / "__init__.py").is_file() or (base_dir / f"{top}.py").is_file():
                hint = (
                    f" ({top} is next to the job file: list it under modules: so it can be "
                    "imported here and travels to the nodes)"
                )
            raise ConfigError(f"module '{target}' not found{hint}") from exc
        raise ConfigError(f"error while importing module '{target}': {exc}") from exc
    except (Exception, SystemExit) as exc:  # user code: report it, do not crash the console
        raise _import_error(exc, f"module '{target}'") from exc


def _import_error(exc: BaseException, where: str) -> ConfigError:
    """A job module that failed to import: a syntax error's file and line, else where the
    import raised and what."""
    if isinstance(exc, SyntaxError):
        return ConfigError(f"syntax error in {exc.filename or where}:{exc.lineno}: {exc.msg}")
    return ConfigError(f"error while importing {where}: {type(exc).__name__}: {exc}")


def _where_raised(exc: BaseException, path: Path) -> str:
    """``path:line`` of the deepest frame of the user's file, so they can find the bug."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    return f"{path}:{lines[-1]}" if lines else str(path)
