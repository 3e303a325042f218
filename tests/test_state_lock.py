"""One server per state directory (``REMAP_STATE_DIR``): the lock in one process, then two
real servers given one directory, and a SIGKILLed server's lock that must not block the next.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from remap.errors import ConfigError
from remap.server.statelock import LOCK_NAME, StateLock
from tests.cluster_harness import SERVER_SCRIPT, run_entry


def test_a_second_lock_on_one_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """The first lock holds; the second is a ConfigError (exit code 2) in one line naming the
    directory and the holder's pid; once the first lets go, the next one takes it."""
    state = tmp_path / "state"
    first = StateLock(state)
    first.acquire()
    assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(ConfigError) as refused:
        StateLock(state).acquire()
    line = str(refused.value)
    assert "\n" not in line and refused.value.exit_code == 2
    assert f"state directory {state} is in use by another remap server (pid {os.getpid()})" in line
    assert "REMAP_STATE_DIR" in line
    first.release()
    second = StateLock(state)
    second.acquire()  # free again; the file left by the first is taken over
    second.release()


def test_a_lock_file_left_by_a_dead_server_does_not_block(tmp_path: Path) -> None:
    """A lock file nobody holds (its server was SIGKILLed: the kernel dropped the lock) is
    taken over, and says the new holder's pid."""
    state = tmp_path / "state"
    state.mkdir()
    (state / LOCK_NAME).write_text("999999\n")
    lock = StateLock(state)
    lock.acquire()
    assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    lock.release()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775, 0o757])
def test_a_state_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """A state directory others can write (a shared /tmp path, a group's directory) is one
    line naming it and its mode, before anything in it is opened: they could replace the
    journal, and a restarted server would send its planted jobs to the nodes to run. A
    directory only its owner writes (0755, as systemd's StateDirectory) is fine."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        StateLock(state).acquire()
    line = str(refused.value)
    assert "\n" not in line and refused.value.exit_code == 2
    assert f"{state} (REMAP_STATE_DIR) is writable by others (mode {mode:04o})" in line
    assert not (state / LOCK_NAME).exists()
    state.chmod(0o755)
    lock = StateLock(state)
    lock.acquire()
    lock.release()


def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """A state directory another user owns (made first under a guessable name) is refused,
    whatever its mode: its owner could replace the journal at any time."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    try:
        os.chown(state, os.geteuid() + 1, -1)
    except PermissionError:
        pytest.skip("giving a directory to another user needs root")
    with pytest.raises(ConfigError, match=r"is owned by another user \(uid \d+\)"):
        StateLock(state).acquire()


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_a_lock_file_planted_in_the_state_directory_is_refused_untouched(
    tmp_path: Path, plant: str
) -> None:
    """``server.lock`` as a link to another file (a state directory others can write: /tmp),
    or not a plain file, is one line naming it; the file it points at is not emptied (the lock
    truncated it to the server's pid)."""
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = state / LOCK_NAME
    if plant == "symlink":
        lock.symlink_to(victim)
    elif plant == "hardlink":
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    with pytest.raises(ConfigError, match=f"{LOCK_NAME}: it is a symbolic link|not a plain") as e:
        StateLock(state).acquire()
    assert "\n" not in str(e.value)
    assert victim.read_text() == "precious\n"


@pytest.mark.slow
def test_two_real_servers_on_one_state_directory(make_cluster, tmp_path: Path) -> None:
    """A second server given a running server's state directory exits at start with code 2
    and one line naming the directory and the first server's pid (it used to run on the same
    journal, or stop with "database is locked"); the first keeps serving. After the first is
    SIGKILLed a new server on that directory starts."""
    state = tmp_path / "state"
    c = make_cluster(1, server_env={"REMAP_STATE_DIR": str(state)})
    assert c.server is not None
    first = c.server.pid
    second = run_entry(
        SERVER_SCRIPT,
        "--port",
        "0",
        "--env-file",
        "/dev/null",
        home=c.home,
        env={"REMAP_STATE_DIR": str(state), "REMAP_SECRET_KEY": c.secret},
        timeout=60,
    )
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr
    assert lines == [
        f"error: state directory {state} is in use by another remap server (pid {first}): "
        "give each server its own REMAP_STATE_DIR, or stop that one first"
    ], second.stderr
    assert c.server.alive() and c.status()["nodes"], "the first server still serves"

    c.kill_server(signal.SIGKILL)
    c.start_server(c.port)  # fails if the new server exits (a stale lock refusing it)
    assert c.server.pid != first
    assert (state / LOCK_NAME).read_text() == f"{c.server.pid}\n"
    c.wait_for_node_pids([n.pid for n in c.live_nodes()])
