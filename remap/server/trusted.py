"""The sources that authenticated, kept in ``REMAP_STATE_DIR`` across restarts.

A port keeps half its slots for addresses that authenticated before (see ``admission``). Held
only in memory, that table is empty after a restart: exactly when every node redials at once,
and when a flood of strangers locks them out most easily. So each port's table is saved (a
few seconds after it changes, on a pool thread, whole or not at all, and at a clean stop) and
read back at start. The file is only believed when it is this user's, no one else may write it,
and every entry is an address as the table holds it; else it is ignored, said in one line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .admission import TRUSTED_SOURCES, Admission

#: the file per port, in the state directory
CLUSTER_FILE = "trusted-sources.json"
HTTP_FILE = "trusted-http-sources.json"
#: seconds from a change to its save (a burst of connections costs one write)
SAVE_DELAY = 5.0
#: a larger file is no file of ours (4096 sources of at most 43 characters, quoted, fit)
MAX_BYTES = 64 * TRUSTED_SOURCES


def valid(entry: object) -> bool:
    """Whether ``entry`` is a source as the table holds it: an IPv4 address or an IPv6 /64."""
    if not isinstance(entry, str) or len(entry) > 64:
        return False
    try:
        if "/" in entry:
            net = ipaddress.IPv6Network(entry)
            return net.prefixlen == 64 and str(net) == entry
        return str(ipaddress.IPv4Address(entry)) == entry
    except ValueError:
        return False


class KeptSources:
    """``admission``'s trusted sources, read from ``path`` now and saved there as they change."""

    log = Logger()

    def __init__(self, admission: Admission, path: Path, reactor: Any) -> None:
        self.admission = admission
        self.path = path
        self.reactor = reactor
        self._timer: Any = None
        self._lock = threading.Lock()  # one write at a time; an older one never lands last
        self._queued = self._written = 0  # numbers of the snapshots queued and written
        for entry in self.read():
            admission.trust(entry)
        admission.on_trust = self.changed

    def read(self) -> list[str]:
        """The saved sources, least recent first; [] (said once) if the file is not believable."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return []
        except OSError as exc:
            return self._ignored(exc.strerror or str(exc))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return self._ignored("not a plain file")
            if info.st_uid != os.geteuid():
                return self._ignored(f"owned by another user (uid {info.st_uid})")
            if info.st_mode & 0o022:
                return self._ignored(f"writable by others (mode {stat.S_IMODE(info.st_mode):04o})")
            data = handle.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            return self._ignored(f"larger than {MAX_BYTES} bytes")
        try:
            sources = json.loads(data.decode("utf-8")).get("sources")
        except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
            return self._ignored("not a JSON object")
        if (
            not isinstance(sources, list)
            or len(sources) > TRUSTED_SOURCES
            or not all(valid(s) for s in sources)
        ):
            return self._ignored(f'not {{"sources": [at most {TRUSTED_SOURCES} IP addresses]}}')
        return sources

    def _ignored(self, why: str) -> list[str]:
        self.log.warn(
            "ignoring {path} ({why}): no source is known to have authenticated before, until "
            "one does again",
            path=str(self.path),
            why=why,
        )
        return []

    def changed(self) -> None:
        """A source authenticated: save within :data:`SAVE_DELAY` seconds."""
        if self._timer is None or not self._timer.active():
            self._timer = self.reactor.callLater(SAVE_DELAY, self._save)

    def _save(self) -> None:
        self._queued += 1
        sources = [s for s in self.admission.trusted if valid(s)]  # (a test's names are not)
        pool = self.reactor.getThreadPool()
        done = deferToThreadPool(self.reactor, pool, self._write, self._queued, sources)
        done.addErrback(lambda f: self._unsaved(f.getErrorMessage()))

    def _unsaved(self, why: str) -> None:
        self.log.warn("cannot save {path}: {why}", path=str(self.path), why=why)

    def flush(self) -> None:
        """At a stop: save what changed since the last save now, on this thread. A failure is
        said, not raised: the server's later parts (the journal, the state lock) still stop."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._queued += 1
            try:
                self._write(self._queued, [s for s in self.admission.trusted if valid(s)])
            except OSError as exc:
                self._unsaved(str(exc))

    def _write(self, number: int, sources: list[str]) -> None:
        """Write snapshot ``number`` unless a later one is written already; by rename, so a
        reader finds the old file or the new one, and mode 0600 whatever the umask allows."""
        with self._lock:
            if number <= self._written:
                return
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps({"sources": sources}).encode() + b"\n")
            os.replace(tmp, self.path)
            self._written = number
