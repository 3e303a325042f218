"""A real server whose journal's disk fills up while a detached job runs, then has room again.

The state directory is a small tmpfs (root only: skipped, saying why, where it cannot be
mounted), filled with a file while the job is held at a gate (``fail_funcs.gated_block``), so
the job's 64 KiB results have nowhere to go whatever the machine's speed.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_harness import Cluster, ClusterError
from tests.test_failures import QUICK, _job
from tests.test_journal_restart import _journal_rows, _stored_indices

pytestmark = pytest.mark.slow


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full (ENOSPC); return it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def test_a_full_disk_holds_the_journal_says_so_and_loses_nothing_once_it_has_room(
    make_cluster: Any, make_tmpfs: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """A detached job of 120 results of 64 KiB (7.5 MiB) runs its first 4, then the journal's
    disk is filled and the gate opened. The server says it cannot write (``status``, one log
    line), refuses a new detached job with that one line, runs an attached one, and the job
    ends in memory. Once the filler is deleted the journal writes what it kept: every
    argument's outcome recorded once, every result stored once, ``attach`` returns them all,
    and the server says nothing more of it."""
    state = make_tmpfs("state", "24m")
    gate = tmp_path / "gate"
    c: Cluster = make_cluster(
        1, cores=2, env={"TEST_GATE": str(gate)}, server_env={"REMAP_STATE_DIR": str(state)}
    )
    n = 120
    detached = _job(tmp_path, "filling", "gated_block", args_range=[0, n], chunksize=1)
    began = c.assert_ok(c.console("compute", detached, "--detach", "--json", timeout=QUICK))
    job_id = json.loads(began.stdout)["job"]

    def rows(sql: str) -> list[tuple]:
        return _journal_rows(c, sql, job_id, state=state)

    def recorded() -> int:
        return rows("SELECT COALESCE(SUM(stop - start), 0) FROM outcomes WHERE job=?")[0][0]

    c.wait_for(lambda: recorded() >= 4, QUICK, "the first 4 outcomes in the journal")
    filler = _fill(state)
    gate.touch()

    def cannot_write() -> str | None:
        return c.status()["server"].get("journal")

    trouble = c.wait_for(cannot_write, 60, "status to say the journal cannot write")
    assert trouble.startswith(f"cannot write the journal {state / 'journal.sqlite'} since ")
    assert "full" in trouble and "detached jobs are refused" in trouble, trouble
    assert trouble in c.assert_ok(c.console("status", timeout=QUICK)).stdout

    another = _job(tmp_path, "refused", "gated_nap", args_range=[0, 2])
    refused = c.console("compute", another, "--detach", timeout=QUICK)
    assert refused.returncode != 0, c.explain(refused)
    (line,) = refused.stderr.strip().splitlines()
    assert "cannot write the journal" in line and "detached jobs are refused" in line, line
    ran = c.assert_ok(c.console("compute", another, "--json", timeout=QUICK))
    assert json.loads(ran.stdout) == [0, 1], "an attached job runs meanwhile"

    def ended_in_memory() -> bool:
        info = c.job(job_id)
        if info is None or info["state"] not in ("running", "done"):
            raise ClusterError(f"the detached job ended {info}")
        return info["state"] == "done"

    c.wait_for(ended_in_memory, 60, "the detached job to end (its results kept in memory)")
    assert rows("SELECT state FROM jobs WHERE id=?") == [("running",)]
    assert recorded() < n, "the journal wrote on a full disk?"

    filler.unlink()

    def written() -> bool:
        done = rows("SELECT state FROM jobs WHERE id=?") == [("done",)]
        return done and cannot_write() is None

    c.wait_for(written, 60, "the journal to write what it kept and say it can again")
    outcomes = "SELECT SUM(stop - start), MIN(start), MAX(stop) FROM outcomes WHERE job=?"
    assert rows(outcomes) == [(n, 0, n)]  # runs never overlap (checked on insert): each once
    assert _stored_indices(c, job_id, state) == list(range(n)), "a result stored twice or missing"
    attached = c.assert_ok(c.console("attach", str(job_id), "--json", timeout=60))
    assert [x for x, _ in json.loads(attached.stdout)] == list(range(n))
    log = c.server.log_text()
    assert log.count("cannot write the journal") == 1, "one line as it starts, not per try"
    assert log.count("is written again") == 1
