"""What a job carries besides its function: local modules and small data files.

On the client, :func:`collect` reads the job's ``modules:`` (a ``FILE.py``, a package directory,
or the name of a module importable here) and ``files:`` into a :class:`Bundle`, and :func:`wrap`
puts it in front of the function's pickle. A core unpickles only that outer layer (bytes and
strings), writes the bundle into the job's directory (once per node), puts its modules first on
``sys.path``, and only then unpickles the function, so that it finds a shipped module. Inside a
task, :func:`job_dir` (``REMAP_JOB_DIR``) is that directory.

A detached data or vertex job's bundle travels to the server as a *tree* (relative path →
bytes, msgpack: nothing a server unpacks runs code), which the server writes with
:func:`write_tree` for the job's driver, which ships it on as an attached job does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import stat
import sys
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
#: entries one bundle tree may hold, and the longest path and deepest nesting of one
MAX_ENTRIES = 10_000
MAX_PATH = 1024
MAX_DEPTH = 32
#: directories one tree may make (a small payload of deep distinct paths made 300,000)
MAX_DIRS = 10_000
#: where a detached job's tree keeps its modules and its files (under the driver's directory)
TREE_MODULES = "modules"
TREE_FILES = "files"


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
        if (path.is_file() and path.suffix == ".py") or (path / "__init__.py").is_file():
            return path.resolve()  # a module, or a package's directory
        raise ConfigError(
            f"modules: {text!r} is not a .py file or a package directory (with __init__.py) "
            f"under {base}"
        )
    if "." in text:  # before find_spec, which would import (run) the parent package
        top = text.split(".", 1)[0]
        raise ConfigError(
            f"modules: ship the top-level package {top!r} of {text!r}, not a submodule"
        )
    try:
        spec = importlib.util.find_spec(text)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        raise ConfigError(f"modules: {text!r} is neither a file here nor an importable module")
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
        for name, path in module_files(root):
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


def module_files(root: Path) -> list[tuple[str, Path]]:
    """The sources a module (a file) or package (a directory) ships: (bundle name, path)."""
    if root.is_file():
        return [(root.name, root)]
    paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return [(f"{root.name}/{p.relative_to(root).as_posix()}", p) for p in paths]


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


# ------------------------------------------------------------- a tree of files by value


def tree(bundle: Bundle) -> tuple[dict[str, bytes], list[str], list[str]]:
    """``bundle`` as relative paths → bytes (modules under ``modules/``, files under
    ``files/``) and the job file's ``modules:`` and ``files:`` naming them in that tree."""
    entries = {f"{TREE_MODULES}/{k}": v for k, v in bundle.modules.items()}
    entries.update({f"{TREE_FILES}/{k}": v for k, v in bundle.files.items()})
    tops = sorted({k.split("/")[0] for k in bundle.modules})
    return (
        entries,
        [f"{TREE_MODULES}/{top}" for top in tops],
        [f"{TREE_FILES}/{name}" for name in bundle.files],
    )


def pack_tree(entries: dict[str, bytes]) -> bytes:
    """A tree as one payload (a msgpack map; empty for no entries)."""
    if not entries:
        return b""
    import msgpack

    return msgpack.packb({k: bytes(v) for k, v in entries.items()}, use_bin_type=True)


def unpack_tree(payload: bytes | memoryview, limit: int = MAX_BUNDLE) -> dict[str, bytes]:
    """A payload of :func:`pack_tree` back as a tree, every name checked (:func:`check_name`)
    and its bytes at most ``limit``; ValueError (one line) if not.

    Read by hand, not by ``msgpack.unpackb``: a tree is one map of text to bytes, and anything
    else is refused at its first byte. msgpack builds whatever a payload declares (a list of
    an array's declared length, maps in maps) before a check could look at it: 64 MiB of
    nested arrays took 450 MiB to refuse, and a frame may be 256 MiB. Here the payload's size
    is bounded first, and nothing is made but the entries themselves."""
    if not payload:
        return {}
    view = memoryview(payload).cast("B")
    most = limit + _MAP_HEAD + MAX_ENTRIES * (MAX_PATH + _STR_HEAD + _BIN_HEAD)
    if len(view) > most:
        raise ValueError(
            f"the shipped files are {len(view):,} bytes packed, over {most:,} "
            f"({limit:,} of files, {MAX_ENTRIES:,} names)"
        )
    try:
        count, pos = _header(view, 0, _MAP)
        if count > MAX_ENTRIES:
            raise ValueError(f"the shipped files are {count:,} entries, over {MAX_ENTRIES:,}")
        entries: dict[str, bytes] = {}
        size = 0
        for _ in range(count):
            n, pos = _header(view, pos, _STR)
            if n > MAX_PATH:
                raise ValueError(f"a bundle entry's name is longer than {MAX_PATH} bytes")
            name = str(view[pos : pos + n], "utf-8")
            pos += n
            check_name(name)
            try:
                n, pos = _header(view, pos, _BIN)
            except _NotThat:
                raise ValueError(f"bundle entry {name[:80]!r} is not bytes") from None
            size += n
            if size > limit:
                raise ValueError(f"the shipped files add up to {size:,} bytes, over {limit:,}")
            if name in entries:
                raise ValueError(f"bundle entry {name[:200]!r} is named twice")
            entries[name] = bytes(view[pos : pos + n])
            pos += n
    except (_NotThat, _Cut) as exc:
        raise ValueError(f"the shipped files are not a bundle tree: {exc}") from None
    except UnicodeDecodeError:
        raise ValueError("the shipped files are not a bundle tree: a name is not UTF-8") from None
    if pos != len(view):
        raise ValueError(
            f"the shipped files are not a bundle tree: {len(view) - pos:,} bytes after its map"
        )
    _check_dirs(entries)
    return entries


def _check_dirs(entries: dict[str, Any]) -> None:
    """At most :data:`MAX_DIRS` directories for a tree's names; ValueError if more."""
    dirs: set[str] = set()
    for name in entries:
        end = name.rfind("/")
        while end > 0 and name[:end] not in dirs:
            dirs.add(name[:end])
            end = name.rfind("/", 0, end)
        if len(dirs) > MAX_DIRS:
            raise ValueError(f"the shipped files are in over {MAX_DIRS:,} directories")


class _NotThat(ValueError):
    """A msgpack item that is not the kind a bundle tree has there."""


class _Cut(ValueError):
    """A msgpack item cut short by the payload's end."""


#: msgpack headers a tree uses: (first byte of the fixed form, its mask), then the first bytes
#: of the 1-, 2- and 4-byte length forms (None: no such form)
_MAP = ("a map", (0x80, 0x0F), (None, 0xDE, 0xDF))
_STR = ("a name", (0xA0, 0x1F), (0xD9, 0xDA, 0xDB))
_BIN = ("bytes", None, (0xC4, 0xC5, 0xC6))
_MAP_HEAD = _STR_HEAD = _BIN_HEAD = 5  # the longest header of each


def _header(view: memoryview, pos: int, kind: tuple) -> tuple[int, int]:
    """The length a msgpack header of ``kind`` at ``pos`` declares, and where its body starts;
    _NotThat if the byte there is another kind, _Cut if the payload ends first."""
    what, fixed, sized = kind
    if pos >= len(view):
        raise _Cut(f"it ends where {what} should be")
    first = view[pos]
    if fixed is not None and first & ~fixed[1] & 0xFF == fixed[0]:
        n, pos = first & fixed[1], pos + 1
    elif first in sized:
        width = 1 << sized.index(first)
        if pos + 1 + width > len(view):
            raise _Cut(f"it ends inside the header of {what}")
        n = int.from_bytes(view[pos + 1 : pos + 1 + width], "big")
        pos += 1 + width
    else:
        raise _NotThat(f"byte {pos:,} (0x{first:02x}) is not {what}")
    if what != "a map" and pos + n > len(view):
        raise _Cut(f"{what} of {n:,} bytes runs past its end")
    return n, pos


def check_name(name: Any) -> str:
    """``name`` if it is a relative path that stays inside a directory it is written under:
    parts separated by ``/``, none empty, ``.`` or ``..``, no NUL; else ValueError."""
    if type(name) is not str or not name:
        raise ValueError(f"bundle entry {str(name)[:80]!r} is not a file name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ValueError(f"bundle entry {name[:80]!r}... is longer than {MAX_PATH} bytes")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") or "\x00" in p for p in parts):
        raise ValueError(f"bundle entry {name[:200]!r} leaves the job directory")
    if len(parts) > MAX_DEPTH:
        raise ValueError(f"bundle entry {name[:80]!r} is nested over {MAX_DEPTH} deep")
    return name


def write_tree(directory: Path, entries: dict[str, bytes]) -> None:
    """Write a tree under ``directory``, which this process made and nobody else writes: every
    name checked first, directories made here, files created new (``O_EXCL``,
    ``O_NOFOLLOW``), so no name, and nothing already there, can send a write outside it."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"the shipped files are {len(entries):,} entries, over {MAX_ENTRIES:,}")
    for name, data in entries.items():
        check_name(name)
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"bundle entry {name[:80]!r} is not bytes")
    _check_dirs(entries)
    made = {"."}
    for name, data in entries.items():
        *dirs, leaf = name.split("/")
        path = ""
        for part in dirs:
            path = f"{path}/{part}" if path else part
            if path not in made:
                target = directory / path
                try:
                    target.mkdir(mode=0o700)
                except FileExistsError:
                    if target.is_symlink() or not target.is_dir():
                        raise ValueError(f"bundle entry {name[:200]!r} crosses a file") from None
                made.add(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(directory / name, flags, 0o600)
        except (FileExistsError, IsADirectoryError):
            raise ValueError(f"bundle entry {name[:200]!r} is named twice") from None
        with os.fdopen(fd, "wb") as out:
            out.write(data)


# --------------------------------------------------------------------------- node side


def node_dir(node_pid: int) -> Path:
    """Where a node's jobs keep their directories (removed when the job or node ends)."""
    import tempfile  # here: a core imports this module, and only a bundle needs it

    return Path(tempfile.gettempdir()) / f"remap-node-{node_pid}"


def job_path(node_pid: int, job: int) -> Path:
    return node_dir(node_pid) / f"job-{job}"


def node_root(node_pid: int, create: bool = False) -> Path | None:
    """This node's directory if it is this user's own and no one else may write it (made here,
    0700, with ``create``); None if it does not exist. Its name in a shared temporary directory
    can be guessed: another user could make it first (or a link by that name) and put a job's
    directory in it, whose modules a core would import. ValueError (one line) for that."""
    path = node_dir(node_pid)
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ValueError(
            f"the node's job directory {path} is not its own (a link, another user's, or "
            "writable by others): remove it and restart the node"
        )
    return path


def install(job: int, modules: dict[str, bytes], files: dict[str, bytes]) -> Path:
    """Write the bundle into this node's directory for ``job`` (once: the first core wins the
    rename) and put its modules first on ``sys.path``."""
    import shutil
    import tempfile

    node_root(os.getppid(), create=True)  # (raises if someone else made it)
    final = job_path(os.getppid(), job)
    if not final.is_dir():
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=".staging-"))
        entries = {f"{MODULES_DIR}/{k}": v for k, v in modules.items()}
        entries.update(files)
        if len(entries) < len(modules) + len(files):
            raise ValueError(f"bundle: a file is named {MODULES_DIR!r}, as its modules' directory")
        try:
            write_tree(staging, entries)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
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


def may_be_bundle(payload: Any) -> bool:
    """Whether a job's function pickle may carry a bundle (a directory on the node); False: it
    surely does not, so the node need not look for or remove one."""
    return _MARK_BYTES in bytes(payload[:64])


def unwrap(payload: Any, job: int) -> Any:
    """The function's pickle: ``payload`` itself, or the one behind a bundle, installed first
    (the bundle's layer holds only bytes and strings, so unpickling it runs no user code)."""
    if not may_be_bundle(payload):
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
    try:
        ours = node_root(os.getppid()) is not None
    except ValueError:  # not the node's own: nothing in it is the job's
        ours = False
    path = job_path(os.getppid(), job)
    enter(path if ours and path.is_dir() else None)


def job_dir() -> Path:
    """The running job's directory on this node (its ``files:`` are there); outside a task
    with shipped files, the current directory."""
    return Path(os.environ.get(ENV) or ".")


def job_file(name: str) -> Path:
    """The path of a file the job shipped with ``files:`` (by its file name)."""
    return job_dir() / name
