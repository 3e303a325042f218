"""The data directory every node sees, and how files in it are committed exactly once.

Its layout (``REMAP_DATA_DIR``) is :class:`DataDir`'s, described in README "Where files go".
An attempt writes ``<final>.<attempt>.tmp`` and commits it by ``os.replace``, so a reader never
sees a partial file; which committed attempt counts is decided by whoever received the task's
result (never by listing a directory). A crash leaves the old file, the new one, or a ``.tmp``
stray that :func:`remove_strays` deletes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RESULT_STATES: tuple[str, ...] = ("INCOMPLETE", "FAIL", "OK")
TMP_SUFFIX = ".tmp"
SUCCESS_MARKER = "_SUCCESS"
DEFAULT_DATA_DIR = "~/.remap/data"

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: never a hidden name (``_x``): a job reading the output as its input would skip it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_job_id() -> str:
    """A data job's id: sortable by start time, unique without asking anyone."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def attempt_token() -> str:
    """A name for one attempt of one task; the host and pid say where a stray came from."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def task_name(kind: str, number: int) -> str:
    return f"{kind}-{number:04d}"


def check_name(what: str, name: str) -> str:
    """A purpose or job id becomes a path component: refuse anything that could escape."""
    pattern = _JOB_ID if what == "job id" else _NAME
    if not isinstance(name, str) or not pattern.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{what} {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class DataDir:
    """Paths inside one data directory."""

    root: Path

    @classmethod
    def from_setting(cls, value: str | os.PathLike[str] | None) -> DataDir:
        """``REMAP_DATA_DIR`` as given, or ``~/.remap/data``; always absolute."""
        return cls(Path(os.path.expanduser(os.fspath(value or DEFAULT_DATA_DIR))).resolve())

    def job_dir(self, job_id: str) -> Path:
        return self.root / "job" / check_name("job id", job_id)

    def jobconfig(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "jobconfig.json"

    def app_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "app"

    def progress_dir(self, job_id: str) -> Path:
        """Running tasks' progress, gone with the scratch: a lost attempt woken later has
        nowhere to write (``consolidated`` keeps each task's delivered attempt's)."""
        return self.im_dir(job_id) / "progress"

    def progress_file(self, job_id: str, task: str, attempt: str) -> Path:
        return self.progress_dir(job_id) / f"{task}.{attempt}.json"

    def consolidated(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "consolidated-progress.json"

    def result_file(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result"

    def result_json(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result.json"

    def im_dir(self, job_id: str) -> Path:
        return self.root / "im" / check_name("job id", job_id)

    def run_dir(self, job_id: str, purpose: str, reducer: int) -> Path:
        return self.im_dir(job_id) / check_name("purpose", purpose) / task_name("reducer", reducer)

    def run_path(
        self, job_id: str, purpose: str, reducer: int, mapper: int, part: int, attempt: str
    ) -> Path:
        """A committed intermediate run of one map attempt for one reducer."""
        name = f"{task_name('mapper', mapper)}-part-{part:05d}.{attempt}"
        return self.run_dir(job_id, purpose, reducer) / name

    def jobs(self) -> list[str]:
        """Job ids with a job directory, oldest first."""
        try:
            return sorted(p.name for p in (self.root / "job").iterdir() if p.is_dir())
        except FileNotFoundError:
            return []


def output_part(output: Path, purpose: str, reducer: int) -> Path:
    """``OUTPUT/<purpose>/reducer-NNNN-part-00000``: a reducer's committed output file."""
    name = f"{task_name('reducer', reducer)}-part-00000"
    return Path(output) / check_name("purpose", purpose) / name


def output_taken(output: Path, kind: str = "data") -> str:
    """Why ``output`` cannot be a data (or vertex) job's (empty: it can)."""
    if output.exists() or output.is_symlink():
        return (
            f"{output} already exists: a {kind} job never overwrites results "
            "(remove it or choose another output)"
        )
    return ""


def tmp_path(final: Path, attempt: str) -> Path:
    """Where an attempt writes ``final`` before committing it."""
    return final.with_name(f"{final.name}.{attempt}{TMP_SUFFIX}")


def _private_tmp(final: Path) -> Path:
    return tmp_path(final, f"w{os.getpid()}-{secrets.token_hex(3)}")


def commit(tmp: Path, final: Path) -> Path:
    """Publish a finished file by rename (atomic on one file system, NFS included)."""
    os.replace(tmp, final)
    return final


class StorageError(Exception):
    """A task could not write its files (disk full, over quota, read-only). It fails the task
    even on ``continue``: as a record's error, the records of the unflushed buffer would be lost."""


_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def storage_trouble(exc: BaseException) -> bool:
    """Whether a write failed for want of room (or of a writable disk)."""
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


def vanished(exc: OSError) -> bool:
    """Whether a file operation failed because what it named was removed under it: ENOENT,
    or on NFS ESTALE (a handle to a file or folder another machine removed)."""
    return exc.errno in (errno.ENOENT, errno.ESTALE)


def storage_error(path: Path, exc: OSError) -> StorageError:
    from ..sinks import os_reason  # only on this path: cores do not load the sinks

    return StorageError(f"cannot write {path}: {os_reason(exc)}")


def write_atomic(path: Path, data: bytes, *, parents: bool = True) -> Path:
    """Write a whole file so readers see the old content or the new, never a part. With
    ``parents=False`` only its own directory is made: FileNotFoundError if the one above is
    gone (a late writer of a job that ended must not make its directories again)."""
    path = Path(path)
    path.parent.mkdir(parents=parents, exist_ok=True)
    tmp = _private_tmp(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        return commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any, *, parents: bool = True) -> Path:
    """:func:`write_atomic` of a JSON document (sorted keys, so files diff well)."""
    text = json.dumps(value, indent=1, sort_keys=True, default=str) + "\n"
    return write_atomic(path, text.encode("utf-8"), parents=parents)


def read_json(path: Path) -> Any:
    """A JSON file written by :func:`write_json`, or None if it is not there (yet)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def write_result(data: DataDir, job_id: str, state: str, **details: Any) -> None:
    """The job's ``result`` (one word) and ``result.json`` (the word with counters, timings)."""
    if state not in RESULT_STATES:
        raise ValueError(f"result state {state!r} is not one of {RESULT_STATES}")
    write_json(data.result_json(job_id), {"state": state, **details})
    write_atomic(data.result_file(job_id), (state + "\n").encode("ascii"))


def read_result(data: DataDir, job_id: str) -> str | None:
    try:
        return data.result_file(job_id).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None


def walk_files(top: Path) -> Iterator[Path]:
    """Every file below ``top`` (nothing if it does not exist)."""
    for dirpath, _, names in os.walk(top):
        for name in names:
            yield Path(dirpath) / name


def remove_strays(top: Path) -> list[Path]:
    """Delete every uncommitted (``.tmp``) file below ``top``; return them."""
    removed = []
    for path in walk_files(top):
        if path.name.endswith(TMP_SUFFIX):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_tree(top: Path) -> None:
    shutil.rmtree(top, ignore_errors=True)


#: the suffix of a folder renamed away to be removed (see :func:`discard`)
GONE = ".gone"


def discard(path: Path) -> Path | None:
    """Remove a folder a late writer (a killed task, a lost worker) may still write in:
    renamed away first, so no write can reach it by its path while it is removed (one racing
    the removal could land in a folder already listed, keeping it and every folder above it
    on disk). Returns the renamed folder if something kept part of it (on NFS, a file a late
    writer still holds open): nobody reads it; it is removed later."""
    trash = path.with_name(path.name + GONE)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return None
    remove_tree(trash)
    return trash if trash.exists() else None


DRIVER_LOCK = "driver.lock"


class JobLock:
    """``job/<jobid>/driver.lock``, ``flock``-ed by a data or vertex job's driver for the job's
    life, so :func:`remove_orphan_scratch` tells a running job's scratch from a dead driver's:
    the kernel (or the NFS server) drops the lock when its process dies.

    Taken before ``im/<jobid>`` is made; on release the file goes only once that scratch is
    gone, so what a driver left behind (a SIGKILL, a failed cleanup) stays findable."""

    def __init__(self, data: DataDir, job_id: str) -> None:
        self.data = data
        self.job_id = job_id
        self.path = data.job_dir(job_id) / DRIVER_LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"data job {self.job_id} is already running ({self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        if not self.data.im_dir(self.job_id).exists():
            self.path.unlink(missing_ok=True)  # while held: nothing left to sweep
        os.close(self._fd)
        self._fd = None


@contextmanager
def locked_if_free(path: Path | str, flags: int) -> Iterator[bool]:
    """Open ``path`` (never through a link) and take its exclusive ``flock`` without waiting:
    True while held, False when it cannot be opened or another process holds it. What the
    sweeps of a dead process's leftovers ask before removing anything."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def remove_orphan_scratch(data: DataDir) -> list[str]:
    """Remove ``im/<jobid>`` of every job whose :class:`JobLock` file is there and unlocked (its
    driver died); return their ids. A job without a lock file (of an earlier release, or still
    starting) is left alone."""
    try:
        names = sorted(entry.name for entry in os.scandir(data.root / "im") if entry.is_dir())
    except OSError:
        return []
    removed = []
    for job_id in names:
        if job_id.endswith(GONE):  # a job's scratch a removal left part of (see discard)
            remove_tree(data.root / "im" / job_id)
            continue
        if not _JOB_ID.match(job_id):
            continue
        lock = data.job_dir(job_id) / DRIVER_LOCK
        with locked_if_free(lock, os.O_RDWR) as free:
            if not free:  # no lock file, or its driver is alive
                continue
            remove_tree(data.im_dir(job_id))
            if not data.im_dir(job_id).exists():
                lock.unlink(missing_ok=True)
                removed.append(job_id)
    return removed


DATA_ID_FILE = ".remap-data-id"
#: seconds a node waits for its data directory to answer before reporting it unusable
PROBE_TIMEOUT = 10.0


def data_id(root: Path) -> str:
    """The token naming the data directory at ``root``: two machines that read the same token
    see the same directory. Written whole under a private name and linked into place (atomic
    and exclusive, NFS included) by whoever comes first, so nobody reads half of one."""
    path = Path(root) / DATA_ID_FILE
    with suppress(FileNotFoundError):
        token = path.read_text(encoding="ascii").strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_tmp(path)
    tmp.write_text(secrets.token_hex(8) + "\n", encoding="ascii")
    try:
        with suppress(FileExistsError):  # someone else was first: theirs is the token
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii").strip()


@dataclass(frozen=True)
class DataDirReport:
    """What a node says about its data directory when it joins (``node_info``)."""

    path: str
    token: str | None
    error: str | None = None


def open_to_all(root: Path) -> str | None:
    """Why the data directory at ``root`` must not be used: everyone may write it (None: not
    so, or it does not exist yet). Tasks unpickle what it holds (run files, vertex messages and
    checkpoints) and a detached job's driver imports its modules from it, so anyone who can
    write it runs code as the cluster's user; a group may share it (NFS), the world may not."""
    try:
        mode = os.stat(root).st_mode
    except OSError:
        return None
    if not mode & 0o002:
        return None
    return (
        f"it is writable by everyone (mode {stat.S_IMODE(mode):04o}): anyone there could plant "
        f"files that tasks unpickle; let only the cluster's user or group write it (chmod o-w "
        f"{root})"
    )


def probe(setting: str | os.PathLike[str] | None) -> DataDirReport:
    """This machine's data directory and its token, or why it cannot be used (never raises)."""
    data = DataDir.from_setting(setting)
    try:
        token = data_id(data.root)
    except OSError as exc:
        return DataDirReport(str(data.root), None, f"{type(exc).__name__}: {exc.strerror or exc}")
    return DataDirReport(str(data.root), token, open_to_all(data.root))


def mismatch(
    node_dir: str | None, node_token: str | None, node_error: str | None, job_dir: str, token: str
) -> str:
    """Why a node cannot take part in a file job (empty: it can, or it did not say)."""
    if node_error:
        return f"cannot use its data directory {node_dir}: {node_error}"
    if node_dir is None or node_token is None:
        return ""  # a node that did not report (the embedded node shares the driver's files)
    if node_token != token:
        return (
            f"its data directory {node_dir} is not the job's {job_dir} (a different directory "
            "there): mount the same directory on every node and point REMAP_DATA_DIR at it"
        )
    if node_dir != job_dir:
        return (
            f"sees the job's data directory at {node_dir}, but tasks use {job_dir}: mount it "
            "at the same path on every node"
        )
    return ""


def require_visible(data: DataDir, job_id: str) -> None:
    """Raise one clear line when this machine does not see the job's config (so not the data
    directory the job was written to)."""
    if not data.jobconfig(job_id).is_file():
        raise DataDirNotShared(
            f"host {socket.gethostname()} does not see the data directory {data.root} "
            f"(no {data.jobconfig(job_id)}): mount the same directory on every node and point "
            "REMAP_DATA_DIR at it"
        )


class DataDirNotShared(ConfigError):
    """A node cannot see the data directory the job was written to."""
