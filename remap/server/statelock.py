"""One server per state directory: a lock the server holds on ``REMAP_STATE_DIR`` for its life.

Two servers on one state directory would write one journal and one exclusion list, so the
first holds an ``flock`` on ``server.lock`` (which holds its pid) and a second is refused at
start, naming that pid. The kernel drops the lock however its holder dies, so a SIGKILLed
server never blocks the next start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = "server.lock"


class StateLock:
    """The lock on ``directory``: :meth:`acquire` at start, :meth:`release` at the very end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`ConfigError` naming the server that holds it."""
        if self._fd is not None:
            return
        cannot = f"cannot lock the state directory {self.directory} (REMAP_STATE_DIR): {self.path}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check_private()
            # not inheritable (PEP 446): a detached job's driver must not keep it after us;
            # never through a link (the lock is truncated: a link planted in a shared state
            # directory would have emptied the file it points at)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
            raise ConfigError(f"{cannot}: {why}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise ConfigError(f"{cannot} is not a plain file of its own (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"state directory {self.directory} is in use by another remap server "
                f"(pid {pid}): give each server its own REMAP_STATE_DIR, or stop that one first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _check_private(self) -> None:
        """ConfigError unless the directory is this user's and only this user may write it:
        whoever can write it can replace the journal, whose jobs' pickles the server sends its
        nodes to run after a restart."""
        info = os.stat(self.directory)
        if info.st_uid != os.geteuid():
            why = f"owned by another user (uid {info.st_uid})"
        elif info.st_mode & 0o022:
            why = f"writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
        else:
            return
        raise ConfigError(
            f"the state directory {self.directory} (REMAP_STATE_DIR) is {why}: whoever can "
            "write it can put jobs in the journal that this server's nodes would run; use a "
            f"directory of this user's own (chmod 700 {self.directory})"
        )

    def release(self) -> None:
        """Let go (the file stays: removing it could let two servers lock two files)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
