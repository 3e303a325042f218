"""Finding a job's input files, cutting them into splits, and reading records from a split.

A split is a byte range of one file. Lines are cut the classic way: a split owns every line
that *starts* inside its range, so a line that crosses a boundary is read whole by the split
it starts in, and every line is read exactly once whatever the split size.
"""

from __future__ import annotations

import glob
import importlib
import os
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: bytes read at a time when counting lines to name the line of a bad record
_COUNT_BLOCK = 1 << 20


class InputChanged(Exception):
    """An input file is shorter than when the job cut it into splits (rewritten or truncated
    while the job ran): its split cannot be read as planned."""


class UnreadableInput(Exception):
    """A compressed input file is corrupt or truncated, or no module here reads its format:
    the message names the file (and the line), not the decompressor's bare complaint."""


@dataclass(frozen=True)
class Split:
    """Bytes ``[start, end)`` of ``path``; ``index`` orders splits by file, then offset."""

    index: int
    path: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


#: names a directory walk or a glob's wildcard skips (Hadoop's convention): a job's output
#: directory holds ``_SUCCESS``, ``_logs/`` and ``.crc`` files and is input as it is
HIDDEN_PREFIXES = (".", "_")


def nothing_named(entry: str | os.PathLike[str], path: Path | str) -> ConfigError:
    """The error for an input entry that names nothing: a typo must not run an empty job."""
    if glob.has_magic(os.fspath(entry)):
        return ConfigError(f"input {entry!r}: no file matches")
    return ConfigError(f"input {entry!r}: no such file or directory ({path})")


def resolve_inputs(inputs: str | Iterable[str], base_dir: Path | str = ".") -> list[Path]:
    """Every input file of a data or vertex job, the one rule for both (README "Inputs").

    An entry (relative to ``base_dir``) is a file, whatever its name; a directory, its files
    recursively; or a glob, its matches (a matching directory is walked), each sorted. A walk
    or a wildcard skips :data:`HIDDEN_PREFIXES` unless the pattern typed that character
    (``_*``). Each file (by resolved path) is read once, where it first came; an existing
    directory with no files gives none (an empty job)."""
    entries = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not entries:
        raise ConfigError("no input given")
    found: dict[Path, None] = {}  # ordered, each resolved path once
    for entry in entries:
        text = os.path.expanduser(os.fspath(entry))
        path = Path(base_dir) / text
        if path.is_file():  # a name with [ ] or * in it is itself before it is a glob
            matches = [path]
        elif path.is_dir():
            matches = sorted(_files_under(path))
        elif os.path.lexists(path):  # a FIFO, a socket, a device or a broken link
            matches = [path]
        else:
            matches = _glob_files(text, base_dir)
            if matches is None:
                raise nothing_named(entry, path)
        for match in matches:
            _check_readable(entry, match)
            fmt = _format(match)
            if fmt is not None and _reader(fmt) is None:  # fail before a cluster starts
                raise ConfigError(f"input {entry!r}: {match}: {fmt.missing}")
        found.update(dict.fromkeys(match.resolve() for match in matches))
    return list(found)


#: what an input path is when it is no regular file, for the error that refuses it
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


def _check_readable(entry: str | os.PathLike[str], path: Path) -> None:
    """A file an entry found must be a regular file: a FIFO would block the task reading it
    (or, without a reader, be taken for an empty file), a broken link fail it later."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise ConfigError(
                f"input {entry!r}: {path} is a broken symbolic link (to {target})"
            ) from None
        raise nothing_named(entry, path) from None
    except OSError as exc:
        raise ConfigError(f"input {entry!r}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "something else")
        raise ConfigError(f"input {entry!r}: {path} is {kind}, not a regular file")


def absolute_entry(entry: str | os.PathLike[str], base_dir: Path | str) -> str:
    """``entry`` as an absolute entry naming the same files from anywhere (a detached job's
    driver resolves it on the server): a glob's base directory is escaped, not a pattern."""
    text = os.path.expanduser(os.fspath(entry))
    path = (Path(base_dir) / text).absolute()
    if path.exists() or not glob.has_magic(text):
        return str(path)
    return _pattern(text, Path(base_dir).absolute())


def _pattern(entry: str, base_dir: Path | str) -> str:
    """Only the entry is a pattern: ``base_dir``'s own name may hold ``[`` (pytest's
    parametrized directories do)."""
    return os.path.join(glob.escape(os.fspath(base_dir)), entry)


def _glob_files(entry: str, base_dir: Path | str) -> list[Path] | None:
    """The files a glob entry finds, sorted; None if it is no glob or matches nothing shown."""
    if not glob.has_magic(entry):
        return None
    pattern = _pattern(entry, base_dir)
    shown = [m for m in glob.glob(pattern, recursive=True) if not _wildcard_hid(pattern, m)]
    if not shown:
        return None
    files: list[Path] = []
    for match in map(Path, shown):
        if match.is_dir():
            files += _files_under(match)
        else:  # a file, or what resolve_inputs refuses by name (a FIFO, a broken link)
            files.append(match)
    return sorted(files)


def _wildcard_hid(pattern: str, match: str) -> bool:
    """Whether a wildcard of ``pattern`` matched a hidden name of ``match`` (a pattern
    component that starts with the name's ``.`` or ``_``, as ``_*``, asked for it)."""
    pats = [p for p in pattern.split(os.sep) if p]
    names = [n for n in match.split(os.sep) if n]
    # ``**`` spans any number of names: align what precedes the first from the start and what
    # follows the last from the end; the names between were matched by ``**``
    first = pats.index("**") if "**" in pats else len(pats)
    last = len(pats) - pats[::-1].index("**") if "**" in pats else len(pats)
    head, tail = pats[:first], pats[last:]
    middle = names[len(head) : len(names) - len(tail)]
    pairs = [*zip(head, names), *zip(reversed(tail), reversed(names)), *(("**", n) for n in middle)]
    return any(
        name.startswith(HIDDEN_PREFIXES) and glob.has_magic(pat) and not pat.startswith(name[0])
        for pat, name in pairs
    )


def _files_under(top: Path) -> Iterator[Path]:
    for dirpath, dirnames, names in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(HIDDEN_PREFIXES)]
        for name in names:
            if not name.startswith(HIDDEN_PREFIXES):
                yield Path(dirpath) / name


def make_splits(files: Iterable[Path | str], split_bytes: int, *, splittable: bool) -> list[Split]:
    """Cut files into splits of about ``split_bytes``; unsplittable files stay whole.

    Empty files give no split (they have no records)."""
    if split_bytes < 1:
        raise ValueError("split_bytes must be positive")
    splits: list[Split] = []
    for path in files:
        size = os.path.getsize(path)
        if size == 0:
            continue
        if not splittable or compressed(path):  # a compressed file is read from its start
            splits.append(Split(len(splits), str(path), 0, size))
            continue
        count = max(1, -(-size // split_bytes))
        step = -(-size // count)  # equal parts, none tiny
        for start in range(0, size, step):
            splits.append(Split(len(splits), str(path), start, min(size, start + step)))
    return splits


#: :func:`finer_tail` cuts only splits whose halves hold at least this many bytes
TAIL_MIN_BYTES = 1 << 20


def finer_tail(splits: list[Split], cores: int) -> list[Split]:
    """Cut each of the last ``cores`` splits in two, so the last wave of map tasks is half as
    long and a core waits less for the others at the barrier (16 equal splits on 2 cores leave
    none waiting; 15 and a small one left one core alone for half a split).

    Splits keep their order and are renumbered (values without a combiner still reach a
    reducer in input order); a cut may fall inside a line, which is read by the half it starts
    in, as at every split boundary. Splits smaller than ``2 * TAIL_MIN_BYTES`` stay whole."""
    if cores < 1 or not splits:
        return splits
    ranges = [(s.path, s.start, s.end) for s in splits[:-cores]]
    for s in splits[-cores:]:
        if s.size >= 2 * TAIL_MIN_BYTES and not compressed(s.path):
            middle = s.start + s.size // 2
            ranges += [(s.path, s.start, middle), (s.path, middle, s.end)]
        else:
            ranges.append((s.path, s.start, s.end))
    return [Split(index, path, start, end) for index, (path, start, end) in enumerate(ranges)]


@dataclass(frozen=True)
class _Format:
    """A compression format an input file's name ends in, and the modules that read it."""

    name: str
    modules: tuple[str, ...]  #: the first that imports reads it (each has ``open(path, "rb")``)
    error: str = ""  #: the module's own exception for bad data, besides EOFError and OSError
    missing: str = ""  #: what to do when none imports

    def __post_init__(self) -> None:
        if not self.missing:  # the standard library's, absent from a Python built without it
            why = f"this Python was built without its {self.modules[0]} module"
            object.__setattr__(self, "missing", why)


#: input files decompressed as they are read (by name, as Hadoop does; never split). Modules
#: are imported when a file needs one: a Python without ``_lzma`` still reads the others.
FORMATS = {
    ".gz": _Format("gzip", ("gzip",)),
    ".bz2": _Format("bzip2", ("bz2",)),
    ".xz": _Format("xz", ("lzma",), "LZMAError"),
    ".lzma": _Format("lzma", ("lzma",), "LZMAError"),  # lzma.open reads .xz and .lzma alike
    ".zst": _Format(
        "zstd",
        ("compression.zstd", "backports.zstd"),  # Python 3.14+, or the backport (same API)
        "ZstdError",
        "reading .zst needs Python 3.14+ or `pip install backports.zstd` (on every node); "
        "or decompress it first (zstd -d)",
    ),
}
#: what every decompressor raises for bad data (OSError: gzip's BadGzipFile, bz2's bad stream)
_BAD_DATA: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)


def _format(path: str | os.PathLike[str]) -> _Format | None:
    name = os.fspath(path)
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def _reader(fmt: _Format) -> Any:
    """The first of the format's modules that imports, or None: none is a hard dependency."""
    for name in fmt.modules:
        with suppress(ImportError):
            return importlib.import_module(name)
    return None


def compressed(path: str | os.PathLike[str]) -> bool:
    """Whether an input file is compressed: its split is the whole file, read decompressed
    (offsets and line numbers count decompressed bytes)."""
    return _format(path) is not None


def _open_input(path: str) -> tuple[Any, tuple[type[BaseException], ...]]:
    """The file's bytes from its start, decompressed if its name says so, and what reading
    them raises for bad data (nothing for a plain file: its OSError is the system's)."""
    fmt = _format(path)
    if fmt is None:
        return open(path, "rb"), ()
    module = _reader(fmt)
    if module is None:  # a node without the module (the client checked its own)
        raise UnreadableInput(f"input {path}: {fmt.missing}")
    bad = (*_BAD_DATA, getattr(module, fmt.error)) if fmt.error else _BAD_DATA
    return module.open(path, "rb"), bad


def _unreadable(
    path: str, handle: Any, bad: tuple[type[BaseException], ...], exc: BaseException
) -> UnreadableInput:
    """The error for a compressed file its decompressor refused, where it did."""
    offset = handle.tell()  # decompressed bytes read before the bad data
    try:
        where = f"line {line_number(path, offset)}, decompressed byte {offset}"
    except bad:  # a check at the end of the data (gzip's CRC) fails it again
        where = f"decompressed byte {offset}"
    name = _format(path).name  # type: ignore[union-attr]
    return UnreadableInput(f"input {path}: corrupt or truncated {name} data at {where}: {exc}")


@contextmanager
def _open(split: Split) -> Iterator[tuple[Any, int, int]]:
    """The split's file, opened for reading its bytes at its first line; that line's offset,
    and the offset its lines stop at. Bad compressed data is an :class:`UnreadableInput`."""
    handle, bad = _open_input(split.path)
    end = (sys.maxsize if split.start == 0 else 0) if bad else split.end
    with handle:
        pos = split.start
        if pos > 0 and end > pos:
            handle.seek(pos - 1)
            pos = pos - 1 + len(handle.readline())  # the rest of the line that started before
        try:
            yield handle, pos, end
        except bad as exc:
            raise _unreadable(split.path, handle, bad, exc) from exc


def read_lines(split: Split) -> Iterator[tuple[int, str]]:
    """``(offset, line)`` for every line starting in the split, without its line ending.

    Bytes that are not UTF-8 survive as surrogate escapes (written back unchanged by the
    default writer)."""
    with _open(split) as (handle, pos, end):
        for raw in handle:
            if pos >= end:
                break
            offset = pos
            pos += len(raw)
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield offset, raw.decode("utf-8", "surrogateescape")


#: bytes read and decoded at a time by :func:`read_line_blocks`
LINE_BLOCK = 1 << 20


def read_line_blocks(split: Split, block: int = LINE_BLOCK) -> Iterator[tuple[int, list[str]]]:
    """``(offset, lines)``: the split's lines (as :func:`read_lines`) a block at a time, with
    the byte offset of each block's first line; decoded and cut in C, not line by line."""
    with _open(split) as (handle, pos, end):
        buf = b""
        while pos < end:
            chunk = handle.read(block)
            if not chunk and not buf and end == sys.maxsize:
                return  # the end of a compressed file
            if not chunk and pos + len(buf) < end and end != sys.maxsize:  # else: endless
                size = os.fstat(handle.fileno()).st_size
                raise InputChanged(
                    f"input {split.path} is {size} bytes long, but was {end} or more when "
                    "the job started: it changed while the job ran"
                )
            buf += chunk
            cut = len(buf) if not chunk else buf.rfind(b"\n") + 1
            if cut == 0:
                continue  # no whole line yet: a line longer than a block
            whole, buf = buf[:cut], buf[cut:]
            last = pos + cut > end
            if last:  # keep the lines that start before the split's end
                newline = whole.find(b"\n", end - pos - 1)
                if newline >= 0:
                    whole = whole[: newline + 1]
            text = whole.decode("utf-8", "surrogateescape")
            lines = text.split("\n")
            ended = not lines[-1]
            if ended:
                lines.pop()
            if "\r" in text:  # a CR before a newline ends the line with it
                for i in range(len(lines) - (0 if ended else 1)):
                    if lines[i].endswith("\r"):
                        lines[i] = lines[i][:-1]
            yield pos, lines
            pos += len(whole)
            if last or not chunk:
                return


def line_number(path: str, offset: int) -> int:
    """The 1-based line that starts at byte ``offset`` (counted only when an error needs it)."""
    lines = 1
    with _open_input(path)[0] as handle:
        remaining = offset
        while remaining > 0:
            block = handle.read(min(_COUNT_BLOCK, remaining))
            if not block:
                break
            lines += block.count(b"\n")
            remaining -= len(block)
    return lines
