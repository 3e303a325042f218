"""The issue's chaos test: a server SIGKILLed three times mid-run, three jobs finish exactly once.

Real processes: a server, two nodes of two cores, and three jobs at once: a detached job of
100,000 arguments (``args_range``), a detached ``args_path`` job, and an attached job streamed
from a Python API handle in this process (a generator it reads as the server grants). Every call waits for a start gate
until the three jobs are on the server, then naps so that they run side by side; each job's
last argument waits for another gate, so no job can finish before the third restart; each kill
comes once every job has delivered results on the restarted server (waited for, never slept).
Afterwards every job has each argument's correct result exactly once: the detached jobs in the
journal once it records their end (runs of indices never overlap) and in what ``attach``
returns, the streamed job in what ``map`` returned (its object sink refuses a result delivered
twice).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import remap
from protocol import messages as m
from remap.settings import Settings
from tests.cluster_harness import Cluster, ClusterError, NodeSpec, jobs_function, write_job
from tests.jobs.fail_funcs import paced_gated

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

N_DETACHED = 100_000
N_PATH = 2_000
PATH_FROM = 200_000
N_STREAM = 2_000
STREAM_FROM = 300_000
KILLS = 3
#: seconds each call naps (``fail_funcs.paced_gated``): the big job's 100,000 and the others'
#: 2,000 calls last about as long on a loaded machine, so the three run side by side and
#: every kill lands while all of them have work left
PACE_SMALL, PACE_LARGE = 0.0001, 0.02
#: the console grace on both sides: a restarted server waits this long for the streamed job's
#: handle, which tries this long to get back (generous: a loaded CI machine restarts slowly)
GRACE = 30.0
#: the cluster's and the streamed handle's heartbeat interval
HEARTBEAT = 1.0


def _journal(c: Cluster, sql: str, *params: Any) -> list[tuple]:
    with sqlite3.connect(c.home / ".remap" / "journal.sqlite") as db:
        return db.execute(sql, params).fetchall()


def _streamed(stop: threading.Event) -> Iterator[int]:
    """The streamed job's arguments, read lazily (the handle pulls them as windows open)."""
    for x in range(STREAM_FROM, STREAM_FROM + N_STREAM):
        if stop.is_set():
            return
        yield x


def test_three_jobs_survive_three_server_sigkills_exactly_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    start_gate = tmp_path / "start"
    last = [N_DETACHED - 1, PATH_FROM + N_PATH - 1, STREAM_FROM + N_STREAM - 1]
    env = {
        "REMAP_HEARTBEAT_MISSES": "3",
        "TEST_GATE": str(gate),
        "TEST_GATED": ",".join(map(str, last)),
        "TEST_START_GATE": str(start_gate),
        "TEST_PACE_SMALL": str(PACE_SMALL),
        "TEST_PACE_LARGE": str(PACE_LARGE),
    }
    with Cluster(
        tmp_path / "cluster",
        [NodeSpec(cores=2), NodeSpec(cores=2)],
        # nothing waits on a heartbeat (a SIGKILLed server's connections close at once); beats
        # of 0.3 s lost connections to 0.9 s of starvation on a loaded machine as well
        heartbeat=HEARTBEAT,
        env=env,
        server_env={"REMAP_CONSOLE_GRACE": str(GRACE)},
    ) as c:
        function = jobs_function("fail_funcs", "paced_gated")
        big = write_job(
            tmp_path / "big.yaml",
            {"name": "big", "function": function, "args_range": [0, N_DETACHED]},
        )
        args_file = tmp_path / "args.txt"
        args_file.write_text("".join(f"{x}\n" for x in range(PATH_FROM, PATH_FROM + N_PATH)))
        from_path = write_job(
            tmp_path / "from-path.yaml",
            {"name": "from-path", "function": function, "args_path": str(args_file)},
        )
        submitting = {
            name: c.console_popen("compute", job, "--detach", "--json")
            for name, job in (("big", big), ("from-path", from_path))
        }

        outcome: dict[str, Any] = {}
        stop = threading.Event()
        settings = Settings(console_grace=GRACE, heartbeat_interval=HEARTBEAT)

        def stream() -> None:
            try:
                with remap.connect(c.address, secret=c.secret, settings=settings) as handle:
                    outcome["results"] = handle.map(paced_gated, _streamed(stop))
                    outcome["reconnects"] = handle._client.reconnects
            except BaseException as exc:  # reported by the test thread
                outcome["error"] = exc

        streamer = threading.Thread(target=stream, name="streamed-job", daemon=True)
        streamer.start()

        def running() -> dict[str, dict]:
            if "error" in outcome:
                raise ClusterError(f"the streamed job failed: {outcome['error']!r}")
            jobs = {j["name"]: j for j in c.status()["jobs"]}
            by = {"big": jobs.get("big"), "from-path": jobs.get("from-path")}
            by["stream"] = next((j for n, j in jobs.items() if n.startswith("map:")), None)
            for name, info in by.items():
                if info is not None and info["state"] != "running":
                    raise ClusterError(f"job {name} ended {info['state']}: {info}")
            return by

        # every call waits for the start gate: open it once the three jobs are on the server
        c.wait_for(lambda: all(running().values()), 60, "the three jobs to be submitted")
        start_gate.touch()
        # a detached job survives a restart once its console has sent every argument
        ids = {}
        for name, proc in submitting.items():
            done = c.assert_ok(c.finish(proc, timeout=60))
            ids[name] = json.loads(done.stdout)["job"]
        marks = {"big": -1, "from-path": -1, "stream": -1}
        totals = {"big": N_DETACHED, "from-path": N_PATH, "stream": N_STREAM}
        at_kills: list[dict[str, float]] = []  # each job's share done at each kill (in -rP output)
        for kill in range(KILLS):

            def progressed(marks: dict = marks, kill: int = kill) -> dict | None:
                by = running()
                if any(info is None for info in by.values()):
                    return None
                for name, info in by.items():
                    if info["done"] >= totals[name] - 1:  # parked at its gated last argument
                        raise ClusterError(
                            f"job {name} ran to its end before kill {kill + 1}: the pacing is too "
                            f"fast for this machine ({info})"
                        )
                if by["stream"]["received"] == 0 or not by["stream"]["attached"]:
                    return None  # the handle has not resumed the streamed job yet
                if all(by[name]["done"] > marks[name] for name in marks):
                    return by
                return None

            by = c.wait_for(progressed, 90, f"all three jobs delivering results (kill {kill + 1})")
            marks = {name: info["done"] for name, info in by.items()}
            at_kills.append({name: marks[name] / totals[name] for name in marks})
            c.restart_server(signal.SIGKILL, timeout=60)
            # done counts shown right after a restart: the detached jobs resume from the journal
            # (what was committed), the streamed one from what its handle holds
        c.wait_for(
            lambda: (
                all(info is not None for info in running().values())
                and running()["stream"]["attached"]
            ),
            90,
            "the streamed job resumed after the last restart",
        )
        gate.touch()

        def finished() -> bool:
            jobs = {j["id"]: j for j in c.status()["jobs"]}
            for job_id in ids.values():
                if jobs[job_id]["state"] not in ("running", "done"):
                    raise ClusterError(f"job {job_id} ended {jobs[job_id]}")
            return all(jobs[j]["state"] == "done" for j in ids.values()) and not streamer.is_alive()

        c.wait_for(finished, 120, "the three jobs to finish")
        print("share of each job done at each kill:", at_kills)
        stop.set()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["results"] == [x * x for x in range(STREAM_FROM, STREAM_FROM + N_STREAM)]
        # one reconnect per kill at least; a long stall on a loaded 2-core machine can also end
        # a connection by silence (with 0.3 s beats CI saw 4 for 3 kills at load 10), and the
        # handle then dials again and resumes: the exactly-once results above are the promise
        assert outcome["reconnects"] >= KILLS

        # status shows a job done as its last outcome is delivered; the journal commits that
        # end with its last outcomes a group commit later (50 ms, on its writer's thread, later
        # on a loaded machine): read the file once it records the end (CI read it between the
        # two once: 'done' in status, 256 outcomes not yet committed)
        c.wait_for(
            lambda: all(
                _journal(c, "SELECT finished_at IS NOT NULL FROM jobs WHERE id=?", job_id) == [(1,)]
                for job_id in ids.values()
            ),
            30,
            "the journal to record the detached jobs' end",
        )
        for name, n, first in (("big", N_DETACHED, 0), ("from-path", N_PATH, PATH_FROM)):
            job_id = ids[name]
            runs = _journal(
                c,
                "SELECT SUM(stop - start), MIN(start), MAX(stop) FROM outcomes WHERE job=?",
                job_id,
            )
            assert runs == [(n, 0, n)], f"{name}: outcomes recorded {runs}"
            stored = sorted(
                i
                for (header,) in _journal(c, "SELECT header FROM results WHERE job=?", job_id)
                for i in m.decode(header, b"").answered
            )
            assert stored == list(range(n)), f"{name}: a result stored twice or missing"
            attached = c.assert_ok(c.console("attach", str(job_id), "--json", timeout=60))
            assert json.loads(attached.stdout) == [x * x for x in range(first, first + n)], name
