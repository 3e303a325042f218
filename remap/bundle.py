"""What a job carries besides its function: local modules and small data files.

On the client, :func:`collect` reads the job's ``modules:`` (a ``FILE.py``, a package directory,
or the name of a module importable here) and ``files:`` into a :class:`Bundle`, and :func:`wrap`
puts it in front of the function's pickle. On a node, the core unpickles only the outer layer,
plain bytes and strings, writes the bundle into the job's directory (once per node, whichever
core gets there first), puts its modules first on ``sys.path``, and only then unpickles the
function, so a function that imports a shipped module finds it.

Inside a task, :func:`job_dir` (also ``REMAP_JOB_DIR`` in the environment) is that directory:
``remap.job_file("data.csv")`` is the path of a shipped file there.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ConfigError

MARK = "remap-bundle-1"
_MARK_BYTES = MARK.encode()
#: bytes of modules and files one job may carry (they travel in one message to every node)
MAX_BUNDLE = 64 << 20
MODULES_DIR = "__modules__"
ENV = "REMAP_JOB_DIR"


@dataclass
class Bundle:
    modules: dict[str, bytes] = field(default_factory=dict)  # path under __modules__/ → bytes
    files: dict[str, bytes] = field(default_factory=dict)  # file name → bytes

    def __bool__(self) -> bool:
        return bool(self.modules or self.files)

    @property
    def size(self) -> int:
        return sum(map(len, self.modules.values())) + sum(map(len, self.files.values()))


def module_root(entry: str | Path | ModuleType, base: Path) -> Path:
    """The file (a module) or directory (a package) an entry of ``modules:`` names."""
    if isinstance(entry, ModuleType):
        origin = getattr(entry, "__file__", None)
        if not origin:
            raise ConfigError(f"module {entry.__name__} has no file to ship")
        path = Path(origin)
        return path.parent if path.name == "__init__.py" else path
    text = str(entry)
    path = (base / text).expanduser()
    if path.exists() or text.endswith(".py") or "/" in text or os.sep in text:
        if path.is_file() and path.suffix == ".py":
            return path.resolve()
        if path.is_dir() and (path / "__init__.py").is_file():
            return path.resolve()
        raise ConfigError(
            f"modules: {text!r} is not a .py file or a package directory (with __init__.py) "
            f"under {base}"
        )
    try:
        spec = importlib.util.find_spec(text)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        raise ConfigError(f"modules: {text!r} is neither a file here nor an importable module")
    if "." in text:
        raise ConfigError(f"modules: ship the top-level package of {text!r}, not a submodule")
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def make_importable(modules: Any, base: Path | str) -> None:
    """Put the directories of shipped module files and packages on this process's path."""
    for entry in modules:
        if isinstance(entry, ModuleType) or not (Path(base) / str(entry)).exists():
            continue  # importable already
        parent = str(module_root(entry, Path(base)).parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)


def collect(modules: list[Any], files: list[Any], base: Path | str = ".") -> Bundle:
    """Read the sources of ``modules`` and the bytes of ``files``; one ConfigError if not."""
    base = Path(base)
    bundle = Bundle()
    for entry in modules:
        root = module_root(entry, base)
        paths = (
            [root]
            if root.is_file()
            else sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
        )
        for path in paths:
            name = path.name if root.is_file() else f"{root.name}/{path.relative_to(root)}"
            bundle.modules[name] = _read(path, "module")
    for entry in files:
        path = (base / str(entry)).expanduser()
        if not path.is_file():
            raise ConfigError(f"files: {str(entry)!r} is not a file under {base}")
        if path.name in bundle.files:
            raise ConfigError(f"files: two files are named {path.name!r}; names must differ")
        bundle.files[path.name] = _read(path, "file")
    if bundle.size > MAX_BUNDLE:
        raise ConfigError(
            f"modules and files add up to {bundle.size} bytes, over {MAX_BUNDLE}: ship large "
            "data another way (a shared directory)"
        )
    return bundle


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def wrap(function_blob: bytes, bundle: Bundle) -> bytes:
    """The payload a node gets: the function's pickle alone, or behind the bundle."""
    if not bundle:
        return function_blob
    return pickle.dumps((MARK, bundle.modules, bundle.files, function_blob), 5)


# --------------------------------------------------------------------------- node side


def node_dir(node_pid: int) -> Path:
    """Where a node's jobs keep their directories (removed when the job or node ends)."""
    return Path(tempfile.gettempdir()) / f"remap-node-{node_pid}"


def job_path(node_pid: int, job: int) -> Path:
    return node_dir(node_pid) / f"job-{job}"


def install(job: int, modules: dict[str, bytes], files: dict[str, bytes]) -> Path:
    """Write the bundle into this node's directory for ``job`` (once: the first core wins the
    rename) and put its modules first on ``sys.path``."""
    final = job_path(os.getppid(), job)
    if not final.is_dir():
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=".staging-"))
        for name, data in [
            *((f"{MODULES_DIR}/{k}", v) for k, v in modules.items()),
            *files.items(),
        ]:
            target = (staging / name).resolve()
            if staging.resolve() not in target.parents:
                raise ValueError(f"bundle entry {name!r} leaves the job directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            os.rename(staging, final)
        except OSError:  # another core was first: its copy is the same
            shutil.rmtree(staging, ignore_errors=True)
    shipped = str(final / MODULES_DIR)
    tops = {name.split("/")[0].removesuffix(".py") for name in modules}
    for name in list(sys.modules):  # a shipped module replaces what an earlier job shipped
        if name.split(".")[0] in tops:
            del sys.modules[name]
    # forget the modules of jobs whose directories the node removed
    sys.path[:] = [p for p in sys.path if not p.startswith(str(final.parent)) or Path(p).is_dir()]
    if modules and shipped not in sys.path:
        sys.path.insert(0, shipped)
    importlib.invalidate_caches()
    return final


def unwrap(payload: Any, job: int) -> Any:
    """The function's pickle: ``payload`` itself, or the one behind a bundle, installed first
    (the bundle's layer holds only bytes and strings, so unpickling it runs no user code)."""
    if _MARK_BYTES not in bytes(payload[:64]):
        return payload
    obj = pickle.loads(payload)
    if type(obj) is not tuple or len(obj) != 4 or obj[0] != MARK:
        return payload
    _, modules, files, inner = obj
    enter(install(job, modules, files))
    return inner


def enter(path: Path | None) -> None:
    """Make ``path`` the directory :func:`job_dir` names (for the batch about to run)."""
    if path is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = str(path)


def enter_job(job: int) -> None:
    """In a core, before a batch of ``job``: its directory, if it shipped a bundle."""
    path = job_path(os.getppid(), job)
    enter(path if path.is_dir() else None)


def job_dir() -> Path:
    """The running job's directory on this node (its ``files:`` are there); outside a task
    with shipped files, the current directory."""
    return Path(os.environ.get(ENV) or ".")


def job_file(name: str) -> Path:
    """The path of a file the job shipped with ``files:`` (by its file name)."""
    return job_dir() / name
