"""The trusted-source tables kept in REMAP_STATE_DIR (``remap.server.trusted``), without sockets:
a fake clock, a thread pool that runs its work at once. The restart of a real server is in
``test_security_e2e.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from remap.server import trusted
from remap.server.admission import TRUSTED_SOURCES, Admission, source
from remap.server.trusted import SAVE_DELAY, KeptSources


class Reactor(Clock):
    """A clock whose thread pool runs each call at once, on this thread, and keeps its results."""

    def getThreadPool(self) -> Reactor:  # noqa: N802 - Twisted's name
        return self

    def callInThreadWithCallback(self, done: Any, work: Any, *args: Any) -> None:  # noqa: N802
        try:
            done(True, work(*args))
        except Exception:  # noqa: BLE001 - handed to the Deferred as Twisted's pool does
            done(False, Failure())

    def callFromThread(self, call: Any, *args: Any) -> None:  # noqa: N802
        call(*args)


@pytest.fixture
def logged() -> Any:
    lines: list[dict] = []
    globalLogPublisher.addObserver(lines.append)
    yield lambda: [e for e in lines if e.get("log_namespace", "").endswith("KeptSources")]
    globalLogPublisher.removeObserver(lines.append)


def kept(path: Path, reactor: Any = None) -> tuple[Admission, KeptSources]:
    admission = Admission(4, 4, reserved=2)
    return admission, KeptSources(admission, path, reactor or Reactor())


def test_a_change_is_saved_after_the_delay_and_read_back(tmp_path: Path, logged: Any) -> None:
    """Sources that authenticated are written once, SAVE_DELAY s after the first change (a burst
    costs one write), mode 0600, least recent first, only addresses; a new table reads them back
    in that order, so its oldest is evicted first."""
    path, reactor = tmp_path / "t.json", Reactor()
    admission, _ = kept(path, reactor)
    for host in ("10.0.0.1", "::ffff:10.0.0.2", "2001:db8::1", "a-test-name", "10.0.0.1"):
        admission.trust(source(host))
    reactor.advance(SAVE_DELAY - 0.1)
    assert not path.exists()
    reactor.advance(0.1)
    sources = ["10.0.0.2", "2001:db8::/64", "10.0.0.1"]
    assert json.loads(path.read_text()) == {"sources": sources}
    assert path.stat().st_mode & 0o777 == 0o600
    assert list(kept(path)[0].trusted) == sources
    assert logged() == []


def test_an_older_snapshot_never_lands_after_a_newer_one(tmp_path: Path) -> None:
    """Two saves finishing out of order: the later table stays (the pool may run them so)."""
    path = tmp_path / "t.json"
    _, keeper = kept(path)
    keeper._write(2, ["10.0.0.2"])
    keeper._write(1, ["10.0.0.1"])
    assert json.loads(path.read_text()) == {"sources": ["10.0.0.2"]}


def test_a_stop_saves_what_changed_since_the_last_save(tmp_path: Path) -> None:
    """flush() writes at once when a save is due, and nothing when none is."""
    path, reactor = tmp_path / "t.json", Reactor()
    admission, keeper = kept(path, reactor)
    keeper.flush()
    assert not path.exists()
    admission.trust("10.0.0.3")
    keeper.flush()
    assert json.loads(path.read_text()) == {"sources": ["10.0.0.3"]}
    assert reactor.getDelayedCalls() == []


def test_a_failed_save_is_one_log_line(tmp_path: Path, logged: Any) -> None:
    """A save that cannot write (its directory gone) says so and keeps the table in memory."""
    path, reactor = tmp_path / "gone" / "t.json", Reactor()
    admission, _ = kept(path, reactor)
    admission.trust("10.0.0.4")
    reactor.advance(SAVE_DELAY)
    assert [e["log_format"].split(":")[0] for e in logged()] == ["cannot save {path}"]
    assert list(admission.trusted) == ["10.0.0.4"]


def test_a_stop_whose_save_fails_says_so_and_stops(tmp_path: Path, logged: Any) -> None:
    """flush() at a stop that cannot write (the disk full, the directory gone) logs the one line
    a save on the pool says and returns: the server's later parts (the journal, the state lock)
    are still stopped after it."""
    path, reactor = tmp_path / "gone" / "t.json", Reactor()
    admission, keeper = kept(path, reactor)
    admission.trust("10.0.0.7")
    keeper.flush()
    assert [e["log_format"].split(":")[0] for e in logged()] == ["cannot save {path}"]
    assert reactor.getDelayedCalls() == []


BAD_FILES = {
    "not JSON": (b"\x00garbage", "not a JSON object"),
    "not an object": (b"[1, 2]", "not a JSON object"),
    "no list": (b'{"sources": "10.0.0.1"}', "IP addresses"),
    "a name": (b'{"sources": ["10.0.0.1", "example.org"]}', "IP addresses"),
    "an IPv6 address, not its /64": (b'{"sources": ["2001:db8::1"]}', "IP addresses"),
    "too many": (
        json.dumps({"sources": ["10.0.0.1"] * (TRUSTED_SOURCES + 1)}).encode(),
        "IP addresses",
    ),
    "too large": (b" " * (trusted.MAX_BYTES + 1), "larger than"),
    "nested too deep": (b'{"sources": ' + b"[" * 100_000, "not a JSON object"),
}


@pytest.mark.parametrize("content", list(BAD_FILES))
def test_a_corrupt_file_is_ignored_in_one_line(tmp_path: Path, logged: Any, content: str) -> None:
    """A file that is not a list of sources as the table holds them is not believed at all
    (not even its valid entries): the table starts empty, one line says why, and the next save
    replaces it."""
    path = tmp_path / "t.json"
    path.write_bytes(BAD_FILES[content][0])
    path.chmod(0o600)
    reactor = Reactor()
    admission, _ = kept(path, reactor)
    assert admission.trusted == {}
    assert len(logged()) == 1 and BAD_FILES[content][1] in logged()[0]["why"]
    admission.trust("10.0.0.5")
    reactor.advance(SAVE_DELAY)
    assert json.loads(path.read_text()) == {"sources": ["10.0.0.5"]}


@pytest.mark.parametrize("how", ["another user's", "group-writable", "a symbolic link", "a fifo"])
def test_a_file_others_could_have_written_is_ignored(tmp_path: Path, logged: Any, how: str) -> None:
    """Valid content is not believed from a file another user owns or may write, through a
    link, or from something not a plain file (a fifo is not waited on)."""
    path = tmp_path / "t.json"
    real = tmp_path / "elsewhere.json" if how == "a symbolic link" else path
    if how == "a fifo":
        os.mkfifo(path, 0o600)
    else:
        real.write_text('{"sources": ["10.0.0.6"]}')
        real.chmod(0o620 if how == "group-writable" else 0o600)
    if how == "a symbolic link":
        path.symlink_to(real)
    if how == "another user's":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file to another user")
        os.chown(path, 65534, -1)
    admission, _ = kept(path)
    assert admission.trusted == {}
    assert len(logged()) == 1
