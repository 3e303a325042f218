"""The same job file on remap, Dask and Ray: same outputs in every response mode, same errors.

The engine tests start one ``LocalCluster`` and one local Ray (2 workers each) per module and
skip when dask or ray is not installed (``pip install -e ".[engines]"``); the seam's own tests
(chunks, window, cancelling) run everywhere with a fake engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remap import engines
from remap.console.main import main
from remap.shipping import function_blob

FUNCTION = """\
def sq(x):
    if x == 7:
        raise ValueError("seven")
    return x * x


def add(a, b):
    return a + b
"""

MODES = {
    "object": "",
    "stream": "",
    "sqlite": "output: out.sqlite\n",
    "file": "output: out.jsonl\n",
    "reduce": "reduce: f.py:add\n",
    "none": "",
}


# ----------------------------------------------------------------------- the seam, faked


class FakeEngine(engines.Engine):
    """Runs chunks in this process when the test says so; counts what is in flight."""

    name = "fake"
    workers = 2

    def __init__(self) -> None:
        self.submitted: list[list[tuple[int, Any]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.cancelled: list[Any] = []
        self.ran: dict[int, Any] = {}

    def _submit(self, key: str, blob: Any, star: bool, timeout: Any, chunk: Any) -> Any:
        self.submitted.append(chunk)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.ran[len(self.submitted)] = engines.run_chunk(key, blob, star, timeout, chunk)
        return len(self.submitted)

    def _wait(self, handles: list[Any], timeout: Any) -> list[Any]:
        return [min(handles)]

    def _result(self, handle: Any) -> Any:
        self.in_flight -= 1
        return self.ran.pop(handle)

    def _cancel(self, handles: list[Any]) -> None:
        self.cancelled.extend(handles)


def _sq(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x * x


def test_outcomes_ship_chunks_within_a_bounded_window() -> None:
    engine = FakeEngine()
    out = list(engine.outcomes(function_blob(_sq), engines.chunked(range(100), 10)))
    assert len(engine.submitted) == 10  # one task per chunk, never one per argument
    assert engine.most_in_flight == engines.WINDOW_PER_WORKER * engine.workers
    assert sorted(i for i, _, _ in out) == list(range(100))
    (error,) = [e for _, _, e in out if e is not None]
    assert (error.index, error.type_name, error.message) == (7, "ValueError", "seven")
    assert "in _sq" in error.traceback and "run_chunk" not in error.traceback


def test_closing_the_outcomes_early_cancels_what_is_pending() -> None:
    engine = FakeEngine()
    out = engine.outcomes(function_blob(_sq), engines.chunked(range(100), 10))
    next(out)
    out.close()
    assert len(engine.cancelled) == engine.most_in_flight - 1
    assert len(engine.submitted) < 10


def test_an_overlong_call_is_reported_as_a_timeout_after_it_ran() -> None:
    import time

    def slow(x: float) -> float:
        time.sleep(x)
        return x

    indices, results, errors = engines.run_chunk("0" * 16, function_blob(slow), False, 0.05,
                                                 [(0, 0.0), (1, 0.2)])  # fmt: skip
    assert indices == [0, 1] and results == [0.0, None]
    assert errors[0][:2] == [1, "TimeoutError"] and "cannot stop" in errors[0][2]


class _FlakyRay:
    """``ray.init`` failing with the given errors, then connecting."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.inits = self.shutdowns = 0

    def init(self, **_: Any) -> None:
        self.inits += 1
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_ray_session_that_died_starting_is_asked_for_again() -> None:
    dead = ConnectionAbortedError("Initialization failure from server:\nTraceback ...")
    ray = _FlakyRay(dead, dead)
    engines._connect_ray_client(ray, "h:1")
    assert (ray.inits, ray.shutdowns) == (3, 2)
    ray = _FlakyRay(*[dead] * engines.RAY_CLIENT_ATTEMPTS)
    with pytest.raises(ConnectionAbortedError):
        engines._connect_ray_client(ray, "h:1")
    assert ray.inits == engines.RAY_CLIENT_ATTEMPTS


class _StubRay(_FlakyRay):
    """Enough of ``ray`` for a RayEngine to start and cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[Any] = []

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def is_initialized(self) -> bool:
        return True

    def remote(self, fn: Any) -> Any:
        return type("Remote", (), {"options": lambda self, **_: self})()

    def cancel(self, handle: Any) -> None:
        self.cancelled.append(handle)


@pytest.mark.parametrize("address,cancels", [("local", False), ("h:1", True)])
def test_a_local_ray_run_never_cancels_under_its_own_driver(
    address: str, cancels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray aborts the process that drives it when a cancel races a task's reply (a failed
    internal check; it took the engine tests' process down): with ``ray://local`` that process
    is the caller's, so the few chunks still pending finish; a remote cluster's are cancelled."""
    ray = _StubRay()
    monkeypatch.setitem(__import__("sys").modules, "ray", ray)
    engine = engines.RayEngine(address, workers=2)
    engine._cancel(["a", "b"])
    assert ray.cancelled == (["a", "b"] if cancels else [])


@pytest.mark.parametrize(
    "error", [ConnectionError("ray client connection timeout"), ConnectionAbortedError("token")]
)
def test_other_ray_connection_errors_are_not_retried(error: Exception) -> None:
    ray = _FlakyRay(error)
    with pytest.raises(type(error)):
        engines._connect_ray_client(ray, "h:1")
    assert ray.inits == 1


@pytest.mark.parametrize("url", ["spark://x", "dask://", "dask:local", "ray"])
def test_an_unknown_engine_is_one_line_and_exit_2(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job(tmp_path, "object")
    assert main(["compute", str(job), "--engine", url, "--env-file", "/dev/null"]) == 2
    # only this console's lines: another test's garbage-collected Deferred may log here too
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith(("2", "\t"))]
    assert len(err) == 1 and err[0].startswith(f"error: unknown engine {url!r}"), err


def test_auto_chunks_give_each_worker_several() -> None:
    assert engines.auto_chunksize(100, 2) == 7
    assert engines.auto_chunksize(10**9, 2) == engines.MAX_AUTO_CHUNK
    assert engines.auto_chunksize(None, 2) == 256


# ----------------------------------------------------------------------- real engines


class _Shared(engines.Engine):
    """One module-wide engine behind the console: the run's close() leaves it running."""

    def __init__(self, inner: engines.Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.workers = inner.workers

    def outcomes(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self.inner.outcomes(*args, **kwargs)


def _local(module: str, kind: type[engines.Engine]) -> Iterator[engines.Engine]:
    pytest.importorskip(module)
    engine = kind("local", workers=2)  # type: ignore[call-arg]
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def dask_engine() -> Iterator[engines.Engine]:
    yield from _local("distributed", engines.DaskEngine)


#: the GCS declares a node dead after this many missed health checks (5 by Ray's default, 3 s
#: apart): on a loaded machine a live raylet misses that many, is told it is dead and exits
RAY_PATIENT = {"RAY_health_check_failure_threshold": "40"}


@pytest.fixture(scope="module")
def ray_engine() -> Iterator[engines.Engine]:
    """``ray://local`` with a temp dir of its own (not /tmp/ray, which every other Ray on the
    machine shares), started while ``RAY_ADDRESS`` names a cluster nobody runs: a local engine
    starts a cluster of its own whatever the environment says. A start that fails on Ray's
    side (a loaded machine) is tried once more, saying why."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths are limited
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        env.setenv("RAY_ADDRESS", "127.0.0.1:9")
        for name, value in RAY_PATIENT.items():
            env.setenv(name, value)
        try:
            engine = engines.RayEngine("local", workers=2)
        except Exception as exc:
            warnings.warn(
                f"ray://local failed to start ({exc!r}); starting it once more", stacklevel=2
            )
            ray.shutdown()
            engine = engines.RayEngine("local", workers=2)
    yield engine
    engine.close()
    shutil.rmtree(temp, ignore_errors=True)


def _job(tmp_path: Path, mode: str, on_error: str = "continue", n: int = 40) -> Path:
    (tmp_path / "f.py").write_text(FUNCTION)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"function: f.py:sq\nargs_range: [0, {n}]\nchunksize: 3\nresponse_mode: {mode}\n"
        f"on_error: {on_error}\n{MODES[mode]}"
    )
    return job


def _run(
    tmp_path: Path,
    mode: str,
    url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    engine: engines.Engine | None = None,
    on_error: str = "continue",
) -> tuple[int, list[str], str, Any]:
    """Exit code, stdout lines (sorted for stream: arrival order is the cluster's), stderr,
    and the output file's content."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = _job(tmp_path, mode, on_error)
    if engine is not None:
        monkeypatch.setattr(engines, "open_engine", lambda *a, **k: _Shared(engine))
    argv = ["compute", str(job), "--cores", "2", "--env-file", "/dev/null", "--engine", url]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    if mode == "stream":
        lines.sort()
    content: Any = None
    if mode == "sqlite" and (tmp_path / "out.sqlite").exists():
        with sqlite3.connect(tmp_path / "out.sqlite") as db:
            tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master")}
            if "results" in tables:
                content = db.execute("SELECT * FROM results ORDER BY idx").fetchall()
    if mode == "file" and (tmp_path / "out.jsonl").exists():
        content = (tmp_path / "out.jsonl").read_text()
    return code, lines, err, content


def _assert_same_output(got: Any, want: Any, folder: str, wanted_folder: str) -> None:
    """stdout and the output file agree; tracebacks and summaries name the job's folder, which
    differs by run."""
    same = json.dumps(got[1:4:2]).replace(folder, wanted_folder)
    assert json.loads(same) == json.loads(json.dumps(want[1:4:2])), (got, want)


def on_engines(test: Any) -> Any:
    """Slow, ``engines``, and a timeout that allows a local Ray to start on a loaded machine."""
    return pytest.mark.slow(pytest.mark.engines(pytest.mark.timeout(300)(test)))


def each_engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, engines.Engine]]:
    """``(url, fixture name, engine)`` for Dask then Ray; skips unless both are installed."""
    pytest.importorskip("distributed")
    pytest.importorskip("ray")
    for url, fixture in (("dask://local", "dask_engine"), ("ray://local", "ray_engine")):
        yield url, fixture, request.getfixturevalue(fixture)


@on_engines
@pytest.mark.parametrize("mode", list(MODES))
def test_every_response_mode_gives_remaps_output_on_dask_and_ray(
    mode: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = _run(tmp_path / "remap", mode, "remap", capsys, monkeypatch)
    assert want[0] == 5, want  # argument 7 failed under on_error: continue
    assert want[1] and (mode not in ("sqlite", "file") or want[3])
    for url, fixture, engine in each_engine(request):
        got = _run(tmp_path / fixture, mode, url, capsys, monkeypatch, engine)
        assert got[0] == want[0], (url, got)
        _assert_same_output(got, want, f"/{fixture}/", "/remap/")
        assert "1 argument(s) failed" in got[2]


@pytest.fixture(scope="module")
def remap_engine() -> Iterator[engines.Engine]:
    engine = engines.RemapEngine("local", workers=2)
    yield engine
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_remap_behind_the_seam_gives_the_consoles_own_output(
    mode: str,
    tmp_path: Path,
    remap_engine: engines.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--engine remap://local`` (remap as one implementation of the seam) and the console's
    own path agree in every response mode, under ``continue`` and under ``fail``."""
    for on_error, code in (("continue", 5), ("fail", 1)):
        want = _run(tmp_path / "own" / on_error, mode, "remap", capsys, monkeypatch, None, on_error)
        assert want[0] == code, want
        got = _run(
            tmp_path / "seam" / on_error, mode, "remap://local", capsys, monkeypatch,
            remap_engine, on_error,
        )  # fmt: skip
        assert got[0] == code, got
        if not (mode == "stream" and on_error == "fail"):  # what streamed before it: timing
            _assert_same_output(got, want, "/seam/", "/own/")
        assert "argument 7 raised ValueError: seven" in got[2] or on_error == "continue", got[2]


@pytest.mark.slow
def test_a_remap_server_nobody_listens_on_is_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``remap://HOST:PORT`` with nobody listening is one line and exit 4, like the others."""
    monkeypatch.setenv("REMAP_SECRET_KEY", "engine-test-secret-" + "x" * 16)
    job = _job(tmp_path, "object")
    argv = ["compute", str(job), "--engine", "remap://127.0.0.1:9", "--env-file", "/dev/null"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 4, err
    assert "127.0.0.1:9" in err and "Traceback" not in err, err


@on_engines
@pytest.mark.parametrize("mode", ["object", "sqlite"])
def test_an_error_under_fail_fails_the_job_the_same_way(
    mode: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = _run(tmp_path / "remap", mode, "remap", capsys, monkeypatch, on_error="fail")
    assert want[0] == 1 and "argument 7 raised ValueError: seven" in want[2], want
    assert want[3] is None  # the output was never swapped in
    for url, fixture, engine in each_engine(request):
        got = _run(tmp_path / fixture, mode, url, capsys, monkeypatch, engine, on_error="fail")
        assert got[0] == 1, (url, got)
        assert "argument 7 raised ValueError: seven" in got[2], url
        assert "Traceback" not in got[2]
        assert got[1] == [] and got[3] is None, url
        if mode == "sqlite":
            with sqlite3.connect(tmp_path / fixture / ".out.sqlite.partial") as db:
                kept = db.execute("SELECT idx, error FROM results_partial").fetchall()
            assert 7 in [idx for idx, error in kept if error]


@on_engines
def test_the_console_starts_and_stops_a_local_dask_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path once, no shared engine: ``--engine dask://local`` from the console."""
    pytest.importorskip("distributed")
    before = {t.name for t in threading.enumerate()}
    code, lines, err, _ = _run(tmp_path, "reduce", "dask://local", capsys, monkeypatch)
    assert (code, lines) == (5, [str(sum(x * x for x in range(40) if x != 7))]), err
    assert "remap-engine" not in {t.name for t in threading.enumerate()} - before


def test_an_engine_error_of_several_lines_fails_the_job_in_one(tmp_path: Path) -> None:
    """Dask's errors span lines ('FuturesCancelledError: 1 Future cancelled:\\nReasons: ...');
    the job's error is one line, as every error the console prints."""
    from remap.errors import JobFailed
    from remap.sinks import FileSink

    class Broken(FakeEngine):
        def _wait(self, handles: list[Any], timeout: Any) -> list[Any]:
            raise RuntimeError("1 Future cancelled:\nReasons:\n1 Future cancelled")

    run = engines.EngineRun(Broken(), function_blob(_sq), iter(range(4)), FileSink(tmp_path / "o"))
    with pytest.raises(JobFailed) as failed:
        run.start().result(10)
    assert str(failed.value) == (
        "job failed on fake: RuntimeError: 1 Future cancelled: Reasons: 1 Future cancelled"
    )


def _exit_at_3(x: int) -> int:
    if x == 3:
        import os

        os._exit(1)  # the call takes its worker process down
    return x


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.timeout(300)
def test_a_call_that_kills_its_dask_worker_fails_its_chunk_not_the_job() -> None:
    """A call that exits its worker process on a one-worker ``dask://local``: its chunk runs
    again (``retries``) and then fails with KilledWorker, the other arguments get their
    results. Before, the job's function blob was scattered data held by that worker only: its
    death lost it ("caused the cluster to lose scattered data"), every chunk failed
    FutureCancelledError 'already forgotten', and the job failed with a multi-line error
    (seen with ``--engine dask://local`` on a 2-CPU machine). Dask may also blame a chunk that
    waited on the same worker: that one fails KilledWorker too, never 'forgotten'."""
    pytest.importorskip("distributed")
    engine = engines.DaskEngine("local", workers=1, retries=1)
    try:
        out = list(engine.outcomes(function_blob(_exit_at_3), engines.chunked(range(8), 2)))
    finally:
        engine.close()
    assert sorted(i for i, _, _ in out) == list(range(8))
    errors = {i: e.type_name for i, _, e in out if e is not None}
    assert {2, 3} <= set(errors) and set(errors.values()) == {"KilledWorker"}, errors
    assert all(r == i for i, r, e in out if e is None) and len(errors) < 8, out


@pytest.mark.slow
@pytest.mark.engines
def test_a_scheduler_nobody_listens_on_is_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("distributed")
    job = _job(tmp_path, "object")
    argv = ["compute", str(job), "--engine", "dask://127.0.0.1:9", "--env-file", "/dev/null"]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "could not reach the dask scheduler at 127.0.0.1:9" in err and "Traceback" not in err


# ----------------------------------------------------------------------- the Python API


def test_connect_with_an_engine_url_maps_on_that_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    import remap

    fake = FakeEngine()
    monkeypatch.setattr(engines, "open_engine", lambda *a, **k: fake)
    with remap.connect("dask://local") as cluster:
        assert cluster.map(_sq, range(7)) == [x * x for x in range(7)]
        assert sorted(cluster.imap_unordered(_sq, range(3))) == [0, 1, 4]
        assert cluster.reduce(_sq, range(5), lambda a, b: a + b) == 30
        with pytest.raises(ValueError, match="seven") as raised:
            cluster.map(_sq, range(20), chunksize=2)
    assert "in _sq" in str(raised.value.__cause__)  # the remote traceback
    assert fake.cancelled  # the error cancelled the chunks still in flight


@on_engines
def test_connect_maps_on_dask_and_ray(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    import remap

    for url, _, engine in each_engine(request):
        monkeypatch.setattr(engines, "open_engine", lambda *a, **k: _Shared(engine))  # noqa: B023
        with remap.connect(url) as cluster:
            assert cluster.map(_sq, range(7), chunksize=2) == [x * x for x in range(7)], url
            assert cluster.starmap(pow, [(2, 3), (3, 2)]) == [8, 9], url
            with pytest.raises(ValueError, match="seven"):
                cluster.map(_sq, range(20), chunksize=2)


def test_stopping_a_run_cancels_its_chunks_and_keeps_what_arrived(tmp_path: Path) -> None:
    """Ctrl-C on ``--engine``: the console calls ``fail``; the sink keeps what came, unswapped."""
    from remap.sinks import FileSink

    reached, gate = threading.Event(), threading.Event()

    class Slow(FakeEngine):
        def _wait(self, handles: list[Any], timeout: Any) -> list[Any]:
            if len(self.submitted) > 4:  # the fifth chunk "runs" until the run is stopped
                reached.set()
                gate.wait(10)
            return super()._wait(handles, timeout)

    engine, sink = Slow(), FileSink(tmp_path / "out.jsonl")
    run = engines.EngineRun(engine, function_blob(_sq), iter(range(10, 100)), sink, chunksize=1)
    future = run.start()
    assert reached.wait(10)
    stopper = threading.Thread(target=run.fail, args=(RuntimeError("interrupted"),))
    stopper.start()  # sets the stop flag, then waits for the run's thread
    while run._stop is None:
        stopper.join(0.01)
    gate.set()
    stopper.join(10)
    with pytest.raises(RuntimeError, match="interrupted"):
        future.result(10)
    assert len(engine.cancelled) == 3 and len(engine.submitted) == 5
    assert not (tmp_path / "out.jsonl").exists() and sink.complete is False
    assert (run.done, run.failed) == (1, 0)
    assert (tmp_path / ".out.jsonl.partial").read_text().count("\n") == 1


def test_stopping_a_run_whose_call_never_returns_ends_it_and_its_engine_at_once(
    tmp_path: Path,
) -> None:
    """Ctrl-C while a call runs on (``time.sleep(60)`` on ``ray://local``, seen on a LAN of
    namespaces): the run's thread sees the stop within a poll, cancels the chunks, closes the
    engine (a local cluster stops) and fails the job, so ``fail`` returns at once. Before, the
    thread sat in the engine's wait until the call returned: ``fail`` gave up after 10 s, the
    console exited without closing the engine and ``ray://local`` left two Ray agents running."""
    from remap.sinks import FileSink

    waiting = threading.Event()

    class Hung(FakeEngine):
        closed = False

        def _wait(self, handles: list[Any], timeout: Any) -> list[Any]:
            if 1 in handles:  # the first chunk's call never returns
                waiting.set()
                assert timeout is not None, "a wait that a stop request cannot end"
                time.sleep(timeout)  # the engine's own wait, timing out: nothing done
                return []
            return super()._wait(handles, timeout)

        def close(self) -> None:
            self.closed = True

    engine, sink = Hung(), FileSink(tmp_path / "out.jsonl")
    run = engines.EngineRun(engine, function_blob(_sq), iter(range(10)), sink, chunksize=1)
    future = run.start()
    assert waiting.wait(10)
    started = time.monotonic()
    run.fail(RuntimeError("interrupted"))
    assert time.monotonic() - started < 5
    with pytest.raises(RuntimeError, match="interrupted"):
        future.result(0)
    assert engine.closed and sorted(engine.cancelled) == [1, 2, 3, 4]
    assert not (tmp_path / "out.jsonl").exists() and sink.complete is False


@pytest.mark.slow
def test_remap_engine_url_runs_the_job_on_a_running_server_and_node(tmp_path: Path) -> None:
    """``--engine remap://HOST:PORT`` from a console process against a real server and node:
    the same results as the console's own path, and the server saw the chunk calls."""
    from .test_security_e2e import Cluster

    with Cluster(tmp_path) as cluster:
        server, port = cluster.server()
        cluster.node(port, cores=2)
        cluster.wait_node_joined(server)
        job = cluster.job_file(30)
        own = cluster.console(port, "compute", str(job), "--json")
        seam = cluster.console(
            port, "compute", str(job), "--json", "--engine", f"remap://127.0.0.1:{port}"
        )
        assert own.returncode == 0 and seam.returncode == 0, (own.stderr, seam.stderr)
        assert json.loads(seam.stdout) == json.loads(own.stdout) == [x * x for x in range(30)]
        jobs = cluster.console(port, "jobs", "--json")
        names = [j.get("name", "") for j in json.loads(jobs.stdout)]
        assert any("run_chunk" in name for name in names), names


# ----------------------------------------------------------------------- remote engines


def _command(name: str) -> str:
    """The engine's command line tool, from this interpreter's environment first."""
    import sys

    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"the {name} command comes with the [engines] extra"
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _console(tmp_path: Path, job: Path, url: str, **extra: str) -> Any:
    import sys

    from .test_security_e2e import REPO, child_env

    argv = [sys.executable, str(REPO / "remap_console.py"), "compute", str(job), "--json"]
    argv += ["--engine", url, "--env-file", "/dev/null"]
    env = {**_without_ray_state(child_env(tmp_path / "home")), **extra}
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)


def _without_ray_state(env: dict[str, str]) -> dict[str, str]:
    """``ray.init`` in this process (the ``ray://local`` fixture) exports ``RAY_AUTH_MODE=token``
    and friends into ``os.environ``; a cluster of its own started from here must not inherit
    them (``ray start`` then refuses: token auth on, no token)."""
    env = {k: v for k, v in env.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _check(stdout: str, n: int = 40) -> None:
    """The object-mode output: squares, argument 7 as its error record."""
    got = json.loads(stdout)
    assert [g for i, g in enumerate(got) if i != 7] == [x * x for x in range(n) if x != 7], got
    assert (got[7]["type"], got[7]["message"]) == ("ValueError", "seven"), got[7]


@on_engines
def test_a_running_dask_scheduler_with_workers_of_its_own(tmp_path: Path) -> None:
    """``dask://HOST:PORT``: a scheduler and a worker started as their own processes (as on a
    real cluster); the console connects, runs the job and leaves them running."""
    from .test_security_e2e import wait_for

    pytest.importorskip("distributed")
    dask = _command("dask")
    info = tmp_path / "scheduler.json"
    common = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": tmp_path}
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(info)], **common,
    )  # fmt: skip
    worker = None
    try:
        wait_for(lambda: info.exists() and info.stat().st_size > 0, 120, "the scheduler file")
        address = json.loads(info.read_text())["address"].removeprefix("tcp://")
        worker = subprocess.Popen(
            [dask, "worker", "--scheduler-file", str(info), "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard"], **common,
        )  # fmt: skip
        job = _job(tmp_path, "object")
        done = _console(tmp_path, job, f"dask://{address}")
        assert done.returncode == 5, done.stderr  # argument 7 failed under on_error: continue
        _check(done.stdout)
        assert scheduler.poll() is None  # not ours to stop
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


#: seconds a ``ray start`` may take until its client server listens (a loaded 2-CPU machine)
RAY_START = 150


def _session(sid: int) -> list[Any]:
    """The processes of session ``sid``: a ``ray start`` and all it started."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(OSError):
            if os.getsid(proc.pid) == sid:
                found.append(proc)
    return found


def _stop_session(sid: int) -> None:
    """Stop one ``ray start``'s cluster: ``ray stop`` would stop every Ray on the machine
    (another engineer's run, CI's, this module's ``ray://local``) while they start or run."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = _session(sid)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        if not psutil.wait_procs(procs, timeout=30)[1]:
            return


def _ray_ready(sid: int, port: int) -> bool:
    """The head's GCS and raylet run and its client server accepts connections."""
    import socket

    names = {proc.info["name"] for proc in _session(sid)}
    if not {"gcs_server", "raylet"} <= names:
        return False
    with socket.socket() as s, contextlib.suppress(OSError):
        s.settimeout(1)
        s.connect(("127.0.0.1", port))
        return True
    return False


def _stop_orphaned_heads() -> None:
    """Stop the Ray heads whose test run was killed (its pytest is gone): nothing else would,
    and they hold CPUs and memory on a machine other runs share."""
    import psutil

    for owner in Path(tempfile.gettempdir()).glob("remap-ray-*/owner"):
        with contextlib.suppress(OSError, ValueError):
            pid, sid = map(int, owner.read_text().split())
            if not psutil.pid_exists(pid):
                _stop_session(sid)
                shutil.rmtree(owner.parent, ignore_errors=True)


@contextlib.contextmanager
def _ray_head(env: dict[str, str], log: Path) -> Iterator[tuple[int, int]]:
    """A Ray head of the test's own (``ray start`` in a session of its own, a temp dir and ports
    of its own); yields ``(client server port, session)`` once it is ready, stops exactly its
    processes afterwards (a failed test too). A start that fails on Ray's side is tried once
    more, saying why; what runs on the cluster is never retried."""
    ray = _command("ray")
    _stop_orphaned_heads()
    for attempt in (1, 2):
        gcs, client = _free_port(), _free_port()
        temp = tempfile.mkdtemp(prefix="remap-ray-")  # Ray's socket paths must stay short
        with log.open("w") as out:
            proc = subprocess.Popen(
                [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                 "--ray-client-server-port", str(client), "--num-cpus", "2",
                 "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        Path(temp, "owner").write_text(f"{os.getpid()} {proc.pid}")
        deadline = time.monotonic() + RAY_START
        reason = None
        try:
            code = proc.wait(RAY_START)
            if code != 0:
                reason = f"ray start exited {code}: {log.read_text()[-1500:]}"
            while reason is None and not _ray_ready(proc.pid, client):
                if time.monotonic() > deadline:
                    reason = f"not ready within {RAY_START}s (GCS, raylet, client server)"
                time.sleep(0.2)
        except subprocess.TimeoutExpired:
            reason = f"ray start still running after {RAY_START}s"
        if reason is None:
            break
        _stop_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)
        if attempt == 2:
            pytest.fail(f"a Ray head failed to start twice; the second time: {reason}")
        warnings.warn(f"a Ray head failed to start ({reason}); starting it once more", stacklevel=2)
    try:
        yield client, proc.pid
    finally:
        _stop_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _ray_env(**extra: str) -> dict[str, str]:
    """A ``ray start`` cluster's environment: Ray's token authentication on, so the console
    (a Ray client) presents the same token from its own."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": __import__("secrets").token_hex(32)}
    return {**_without_ray_state(dict(os.environ)), **auth, **RAY_PATIENT, **extra}


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.timeout(2 * RAY_START + 300)
def test_a_running_ray_cluster_through_its_client_server(tmp_path: Path) -> None:
    """``ray://HOST:PORT``: a Ray head started with ``ray start`` (a cluster of its own, with
    its client server on a free port); the console is a Ray client, as against a remote one."""
    pytest.importorskip("ray")
    # the first per-client server the cluster starts dies while starting, as Ray's own fork race
    # (ray-project/ray#63202) makes a few percent of them do: the console connects again
    crash = tmp_path / "crash-first-session"
    crash.mkdir()
    (crash / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--mode=specific-server' in sys.argv:\n"
        "    try:\n"
        f"        os.close(os.open({str(crash / 'crashed')!r}, os.O_CREAT | os.O_EXCL))\n"
        "    except FileExistsError:\n"
        "        pass\n"
        "    else:\n"
        "        os._exit(1)\n"
    )
    # how long the dead one is waited for
    env = _ray_env(PYTHONPATH=str(crash), RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="10")
    with _ray_head(env, tmp_path / "ray-start.log") as (client, sid):
        job = _job(tmp_path, "object")
        done = _console(
            tmp_path,
            job,
            f"ray://127.0.0.1:{client}",
            RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"],
            RAY_AUTH_MODE="token",
        )
        alive = sorted(p.info["name"] for p in _session(sid))  # is it Ray's failure?
        assert done.returncode == 5, (done.stderr, alive)
        _check(done.stdout)
        assert (crash / "crashed").exists(), "the first session's server was never started"


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.timeout(2 * RAY_START + 300)
def test_a_ray_client_server_that_dies_mid_run_fails_the_job_in_one_line(tmp_path: Path) -> None:
    """The cluster's client server killed while the console's job runs: the console fails the
    job with one line and a non-zero exit once Ray gives up reconnecting, and does not hang."""
    pytest.importorskip("ray")
    (tmp_path / "f.py").write_text(
        "import time\n\n\ndef sq(x):\n"
        f"    open({str(tmp_path / 'started')!r}, 'a').close()\n"
        "    time.sleep(1)\n    return x * x\n"
    )
    job = tmp_path / "job.yaml"
    job.write_text("function: f.py:sq\nargs_range: [0, 200]\nchunksize: 1\n")
    env = _ray_env()
    with _ray_head(env, tmp_path / "ray-start.log") as (client, sid):
        from .test_security_e2e import wait_for

        url = f"ray://127.0.0.1:{client}"
        auth = {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        console = threading.Thread(target=lambda: done.append(_console(tmp_path, job, url, **auth)))
        done: list[Any] = []
        console.start()
        wait_for((tmp_path / "started").exists, 120, "the job's first call")
        servers = [p for p in _session(sid) if "ray.util.client.server" in " ".join(p.cmdline())]
        assert servers
        for proc in servers:
            proc.kill()
        console.join(240)
    (got,) = done
    assert got.returncode == 4, got
    assert got.stderr.startswith(
        f"error: lost the connection to the ray cluster at 127.0.0.1:{client}"
    )
    assert got.stderr.count("\n") == 1, got.stderr


@pytest.mark.slow
@pytest.mark.engines
def test_a_ray_client_server_nobody_listens_on_is_exit_4(tmp_path: Path) -> None:
    """``ray://HOST:PORT`` with nobody listening: one line and exit 4 once Ray's client gives up
    (about 30 s), as with the other engines."""
    pytest.importorskip("ray")
    port = _free_port()
    done = _console(tmp_path, _job(tmp_path, "object"), f"ray://127.0.0.1:{port}")
    assert done.returncode == 4, done.stderr
    assert done.stderr == (
        f"error: could not reach the ray cluster at 127.0.0.1:{port}: ray client connection timeout\n"
    )
