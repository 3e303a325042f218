"""A real server process SIGKILLed mid-job and restarted on its journal.

The journal lives in the server's default state directory (``$HOME/.remap``, the harness's
temporary home). Jobs are held mid-run by a gate file (``fail_funcs.gated_nap``), so the kill
lands mid-job however slow the machine is.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from protocol import messages as m
from tests.cluster_harness import Cluster, ClusterError
from tests.test_failures import HEARTBEAT, QUICK, _job

pytestmark = pytest.mark.slow


def _journal_rows(c: Cluster, sql: str, *params: Any, state: Path | None = None) -> list[tuple]:
    """Rows of the journal in ``state`` (default: the server's default state directory)."""
    with sqlite3.connect((state or c.home / ".remap") / "journal.sqlite") as db:
        return db.execute(sql, params).fetchall()


def _stored_indices(c: Cluster, job_id: int, state: Path | None = None) -> list[int]:
    """The argument indices of the job's stored results, sorted (one stored twice shows)."""
    sql = "SELECT header FROM results WHERE job=?"
    rows = _journal_rows(c, sql, job_id, state=state)
    return sorted(i for (header,) in rows for i in m.decode(header, b"").answered)


def _job_info(c: Cluster, job_id: int) -> dict | None:
    return next((j for j in c.status()["jobs"] if j["id"] == job_id), None)


def test_a_detached_job_survives_a_server_sigkill_and_attach_returns_every_result(
    make_cluster: Any, tmp_path: Path
) -> None:
    """A detached job (60 arguments, 4 done, the rest held at a gate) and an attached job are
    running when the server is SIGKILLed. The restarted server resumes the detached job from
    its journal (not from the start); the attached job's console reconnects and resumes it; the
    server is SIGKILLed and restarted once more while the jobs are held at the gate; once the
    gate opens both finish: the journal holds each argument's outcome once, its stored results
    cover each index once, ``attach`` returns every result in order, and the attached
    console prints each of its results once."""
    gate = tmp_path / "gate"
    c = make_cluster(
        2,
        cores=1,
        heartbeat=HEARTBEAT,
        env={"REMAP_HEARTBEAT_MISSES": "3", "TEST_GATE": str(gate)},
        # a restarted server waits this long for the console of an attached job to come back
        server_env={"REMAP_CONSOLE_GRACE": "10"},
    )
    n = 60
    detached = _job(tmp_path, "survivor", "gated_nap", args_range=[0, n], chunksize=1)
    submitted = c.assert_ok(c.console("compute", detached, "--detach", "--json", timeout=QUICK))
    job_id = json.loads(submitted.stdout)["job"]
    assert json.loads(submitted.stdout)["stored"] is True, "returned once in the journal"
    assert "warning" not in submitted.stderr
    streamed = _job(tmp_path, "streamed", "gated_nap", args_range=[100, 110], chunksize=1)
    console = c.console_popen("compute", streamed, "--json")

    def mid_job() -> bool:
        info = _job_info(c, job_id)
        if info is None or info["state"] != "running":
            raise ClusterError(f"the detached job is not running: {info}")
        names = {j["name"] for j in c.status()["jobs"] if j["state"] == "running"}
        recorded = _journal_rows(
            c, "SELECT COALESCE(SUM(stop - start), 0) FROM outcomes WHERE job=?", job_id
        )[0][0]
        return info["done"] >= 4 and recorded >= 4 and "streamed" in names

    c.wait_for(mid_job, QUICK, "4 results of the detached job in the journal, both jobs running")
    c.restart_server(signal.SIGKILL, timeout=30)

    def resumed() -> dict | None:
        info = _job_info(c, job_id)
        return info if info is not None and info["state"] == "running" else None

    info = c.wait_for(resumed, QUICK, "the restarted server to show the detached job running")
    assert info["done"] >= 4, f"resumed from the start, not from the journal: {info}"

    def streamed_back() -> dict | None:
        info = next((j for j in c.status()["jobs"] if j["name"] == "streamed"), None)
        if info is not None and info["state"] != "running":
            raise ClusterError(f"the attached job was not resumed: {info}")
        return info if info is not None and info["attached"] and info["received"] else None

    c.wait_for(streamed_back, QUICK, "the attached job's console to resume it")
    c.restart_server(signal.SIGKILL, timeout=30)  # and again, mid-resume
    info = c.wait_for(resumed, QUICK, "the twice restarted server to show the job running")
    assert info["done"] >= 4, f"resumed from the start, not from the journal: {info}"
    c.wait_for(streamed_back, QUICK, "the attached job's console to resume it again")
    gate.touch()
    out = c.assert_ok(c.finish(console, timeout=QUICK))
    assert json.loads(out.stdout) == [x * x for x in range(100, 110)], c.explain(out)

    def finished() -> bool:
        info = _job_info(c, job_id)
        if info is not None and info["state"] not in ("running", "done"):
            raise ClusterError(f"the detached job ended {info['state']}: {info}")
        return info is not None and info["state"] == "done"

    c.wait_for(finished, 60, "the resumed detached job to finish")
    attached = c.assert_ok(c.console("attach", str(job_id), "--json", timeout=QUICK))
    assert json.loads(attached.stdout) == [x * x for x in range(n)], c.explain(attached)

    outcomes = _journal_rows(
        c, "SELECT SUM(stop - start), MIN(start), MAX(stop) FROM outcomes WHERE job=?", job_id
    )
    assert outcomes == [(n, 0, n)]  # runs never overlap (checked on insert): each index once
    assert _stored_indices(c, job_id) == list(range(n)), "a result stored twice or missing"
