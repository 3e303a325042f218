"""A lone call (``submit(f, x).result()``, its argument written from the calling thread, its
core's lone path, its answer resolved where it is read) fails the way any call fails: a core
SIGKILLed under it, its task timeout, its server restarted or lost while it runs. Each ends in
a result or one RemapError, never a hang, and the cluster takes the next lone call."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import remap
from remap.errors import RemapError
from remap.settings import Settings
from tests.cluster_harness import Cluster as ProcessCluster
from tests.cluster_harness import NodeSpec, wait_for, wait_then

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def square(x: int) -> int:
    return x * x


def kill_my_core(x: int) -> int:
    """Every time: the core running the call dies by SIGKILL."""
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def kill_my_core_once(marker: str, x: int) -> int:
    """The first attempt kills its core (and leaves ``marker``); a retry returns ``x``."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sleep_long(x: int) -> int:
    import time

    time.sleep(60)
    return x


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with ProcessCluster(tmp_path_factory.mktemp("lone-failures"), nodes=[NodeSpec(cores=1)]) as c:
        yield c


def test_a_core_killed_under_a_lone_call_fails_it_with_one_error(procs: ProcessCluster) -> None:
    with remap.connect(procs.address, secret=procs.secret, settings=Settings(), retries=0) as c:
        assert c.submit(square, 3).result(timeout=60) == 9
        with pytest.raises(RemapError):
            c.submit(kill_my_core, 1).result(timeout=90)
        assert c.submit(square, 5).result(timeout=60) == 25  # the core was replaced


def test_a_lone_call_whose_core_died_is_retried_and_answered_once(
    procs: ProcessCluster, tmp_path: Path
) -> None:
    marker = str(tmp_path / "killed")
    with remap.connect(procs.address, secret=procs.secret, settings=Settings(), retries=2) as c:
        future = c.submit(kill_my_core_once, marker, 7)
        assert future.result(timeout=90) == 7
        assert os.path.exists(marker)
        assert [c.submit(square, i).result(timeout=60) for i in range(3)] == [0, 1, 4]


def test_a_lone_call_over_its_task_timeout_fails_and_the_next_runs(procs: ProcessCluster) -> None:
    with remap.connect(
        procs.address, secret=procs.secret, settings=Settings(), retries=0, task_timeout=1.0
    ) as c:
        with pytest.raises(RemapError):
            c.submit(sleep_long, 1).result(timeout=90)
        assert c.submit(square, 6).result(timeout=60) == 36


def test_a_lone_call_outlives_its_servers_restart_or_fails_with_one_error(
    tmp_path: Path,
) -> None:
    """The server restarts (SIGKILL) while a lone call runs: the console dials again and the
    call either comes back (resumed) or fails with one RemapError; it never waits forever,
    and a new lone call on a fresh connection runs."""
    with ProcessCluster(tmp_path / "cluster", nodes=[NodeSpec(cores=1)]) as procs:
        started, release = str(tmp_path / "started"), str(tmp_path / "release")
        with remap.connect(procs.address, secret=procs.secret, settings=Settings()) as c:
            assert c.submit(square, 2).result(timeout=60) == 4
            future = c.submit(wait_then, started, release, 11)
            wait_for(lambda: os.path.exists(started), 60, "the lone call to start")
            procs.restart_server(signal.SIGKILL)
            open(release, "w").close()
            try:
                assert future.result(timeout=120) == 11
            except RemapError:
                pass
        with remap.connect(procs.address, secret=procs.secret, settings=Settings()) as c:
            assert c.submit(square, 8).result(timeout=60) == 64
