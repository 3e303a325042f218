"""``max_cores``, ``min_cores`` and ``priority`` from the Python API reach the scheduler."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import remap
from remap.settings import Settings
from tests.cluster_harness import wait_for


def gated(path: str) -> int:
    """Wait (bounded) until the test opens the gate, so the job's tasks stay in flight."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_cores": -1}, r"max_cores: expected a number of cores >= 0 \(0: no limit\), got -1"),
        ({"min_cores": 1.5}, "min_cores: expected a number of cores >= 0"),
        ({"max_cores": 2, "min_cores": 3}, "min_cores 3 is more than max_cores 2"),
    ],
)
def test_bad_core_limits_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        remap.connect(settings=Settings(), **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_max_cores_caps_the_job_and_status_shows_its_limits(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with remap.connect(
        cores=2, settings=Settings(), max_cores=1, min_cores=1, priority=3
    ) as cluster:
        results = cluster.imap_unordered(gated, [str(gate)] * 2, chunksize=1)

        def capped() -> dict | None:
            jobs = [j for j in cluster.status()["jobs"] if j["state"] == "running"]
            job = jobs[0] if jobs else None
            return job if job and job["running"] == 1 and job["queued"] == 1 else None

        job = wait_for(capped, 20, "one argument running and one queued")
        assert (job["max_cores"], job["min_cores"], job["weight"]) == (1, 1, 8.0)
        for _ in range(3):  # two idle cores' worth of credit, yet the second waits
            again = next(j for j in cluster.status()["jobs"] if j["id"] == job["id"])
            assert again["running"] == 1 and again["cores"] <= 1
        gate.touch()
        assert sorted(results) == [1, 1]
        cluster.max_cores = 0  # the handle's options apply to each job it starts
        assert cluster.map(abs, [-1, -2]) == [1, 2]
