"""How a core packs a batch's results, and how the console unpacks them (no processes)."""

from __future__ import annotations

import mmap
import pickle
import tempfile
from typing import Any

from protocol import messages as m
from protocol.options import JobOptions
from remap.blobs import pack
from remap.client import JobStream
from remap.errors import JobFailed, OutputError
from remap.node.core import SLOT, Core
from remap.shipping import function_blob
from remap.sinks import ObjectSink


class NeedsTwoArgs(Exception):
    """Pickles, but does not unpickle: its __init__ wants two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def run_batch(fn, args) -> tuple[m.TaskResult, bytes]:
    core = Core(mmap.mmap(-1, SLOT.size))
    core.load(m.CoreLoad(job=1, payload=function_blob(fn)))
    sizes, payload = pack(args)
    reply = core.run(m.Task(task=9, job=1, sizes=sizes, payload=payload))
    return reply, reply.payload


class _Client:
    """Stands in for the ClusterClient: records the jobs it was told to kill."""

    link = "up"

    def __init__(self) -> None:
        self.killed: list[int | None] = []

    def kill_quietly(self, job: int | None) -> None:
        self.killed.append(job)

    def forget(self, stream: JobStream) -> None:
        pass


def attached(job: int, on_error: str = "continue") -> tuple[JobStream, _Client]:
    """A stream receiving job ``job``'s results; what it schedules runs at once."""
    client = _Client()
    stream = JobStream(b"", JobOptions(on_error=on_error), call_soon=lambda fn, *a: fn(*a))
    stream.client = client  # type: ignore[assignment]
    stream.session.attach(job)
    return stream, client


def collect(stream: JobStream, sink: Any) -> Any:
    """What has arrived, into the sink on this thread; the job's error if it ended badly."""
    try:
        return stream.collect(sink, until=0)
    except TimeoutError:
        return None
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


def to_console(reply: m.TaskResult, blob: bytes, n: int) -> ObjectSink:
    sink = ObjectSink()
    stream, _ = attached(1)
    stream.results(
        m.Results(
            job=1,
            indices=list(range(n)),
            sizes=reply.sizes,
            errors=reply.errors,
            packed=reply.packed,
            payload=blob,
        )
    )
    collect(stream, sink)
    return sink


def square(x: int) -> int:
    return x * x


def odd_fails(x: int) -> int:
    if x % 2:
        raise NeedsTwoArgs("odd", str(x))
    return x


def returns_a_lambda(x: int):
    return lambda: x


def test_plain_results_travel_as_one_pickle() -> None:
    """Results plain pickle can carry go as one pickle of the list (one size entry)."""
    reply, blob = run_batch(square, range(100))
    assert reply.packed is True and len(reply.sizes) == 1
    assert pickle.loads(blob) == [x * x for x in range(100)]
    assert to_console(reply, blob, 100).value() == [x * x for x in range(100)]


def test_an_exception_that_will_not_unpickle_does_not_spoil_the_batch() -> None:
    """An exception that pickles but cannot be rebuilt is replaced by None in the packed list;
    its neighbours' results and its type, message and traceback all still arrive."""
    reply, blob = run_batch(odd_fails, range(6))
    assert reply.packed is True
    values = to_console(reply, blob, 6).value()
    assert values[0::2] == [0, 2, 4]
    errors = values[1::2]
    assert [e.type_name for e in errors] == ["NeedsTwoArgs"] * 3
    assert errors[0].message == "odd/1" and "odd_fails" in errors[0].traceback
    assert all(e.exception is None for e in errors)


def test_results_that_need_cloudpickle_fall_back_to_one_pickle_each() -> None:
    """A batch whose results plain pickle refuses goes one pickle per result (cloudpickle)."""
    reply, blob = run_batch(returns_a_lambda, range(3))
    assert reply.packed is False and len(reply.sizes) == 3
    values = to_console(reply, blob, 3).value()
    assert [f() for f in values] == [0, 1, 2]


def test_an_unreadable_packed_batch_becomes_errors_not_a_crash() -> None:
    """If the console cannot unpickle a packed batch, every argument of it reports why."""
    blob = b"\x80\x05not a pickle"
    reply = m.TaskResult(task=9, sizes=[len(blob)], packed=True, payload=blob)
    sink = to_console(reply, blob, 2)
    assert [e.type_name for e in sink.value()] == ["ResultUnreadable"] * 2
    assert sink.failed == 2


def test_a_result_frame_over_the_limit_is_reported_not_sent() -> None:
    """The node turns a result too large for the server's frame limit into task_failed
    "too-large" (which the server retries argument by argument), and sends others as they are."""
    from remap.node.agent import NodeAgent

    big = m.TaskResult(task=3, sizes=[100_000], payload=b"x" * 100_000)
    refused = NodeAgent._fits(big, 50_000)
    assert isinstance(refused, m.TaskFailed) and refused.reason == "too-large" and refused.task == 3
    assert "REMAP_MAX_FRAME" in refused.message
    assert NodeAgent._fits(big, 1_000_000) is big


def test_a_result_frame_exactly_at_the_limit_is_sent_and_one_byte_over_is_not() -> None:
    """The node measures a result as the server will: the frame's length field (header and
    hlen included, not the 4 bytes of the length itself), so a frame at the limit goes."""
    from protocol.framing import frame_length
    from remap.node.agent import NodeAgent

    msg = m.TaskResult(task=3, sizes=[100_000], elapsed=0.5, payload=b"x" * 100_000)
    exact = frame_length(*m.encode(msg))
    assert NodeAgent._fits(msg, exact) is msg
    refused = NodeAgent._fits(msg, exact - 1)
    assert isinstance(refused, m.TaskFailed) and refused.reason == "too-large"
    assert f"{exact} bytes" in refused.message


def stop_on(x: int) -> int:
    if x == 1:
        raise KeyboardInterrupt("stop")
    if x == 2:
        raise SystemExit(4)
    return x


def test_keyboard_interrupt_and_system_exit_fail_only_their_call() -> None:
    """A task raising KeyboardInterrupt or SystemExit fails that call with it (as in
    multiprocessing); the core goes on with the rest of the batch instead of dying."""
    reply, blob = run_batch(stop_on, [0, 1, 2, 3])
    sink = to_console(reply, blob, 4)
    assert [e[1] for e in reply.errors] == ["KeyboardInterrupt", "SystemExit"]
    assert [e[0] for e in reply.errors] == [1, 2]
    values = sink.value()
    assert values[0] == 0 and values[3] == 3
    assert [values[1].type_name, values[2].type_name] == ["KeyboardInterrupt", "SystemExit"]


class _WontLoad:
    """Pickles, but loading it calls int("not a number") and raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, ("not a number",))


def _unreadable_one_each(on_error: str) -> tuple[JobStream, ObjectSink, _Client, Any]:
    """A batch sent one pickle per result whose middle result will not unpickle here."""
    blobs = [pickle.dumps(0), pickle.dumps(_WontLoad()), pickle.dumps(2)]
    sink = ObjectSink()
    stream, client = attached(4, on_error)
    stream.results(
        m.Results(
            job=4,
            indices=[0, 1, 2],
            sizes=[len(b) for b in blobs],
            errors=[],
            packed=False,
            payload=b"".join(blobs),
        )
    )
    return stream, sink, client, collect(stream, sink)


def test_a_result_that_will_not_unpickle_is_that_arguments_error() -> None:
    """One pickle per result: an unreadable one is a ResultUnreadable error for its argument
    alone (on_error: continue), counted as failed, and its neighbours arrive."""
    stream, sink, client, error = _unreadable_one_each("continue")
    values = sink.value()
    assert values[0] == 0 and values[2] == 2
    assert values[1].type_name == "ResultUnreadable" and "unpickled here" in values[1].message
    assert (stream.session.done, stream.session.failed, sink.failed) == (2, 1, 1)
    assert error is None and client.killed == []


def test_an_unreadable_result_under_on_error_fail_fails_and_kills_the_job() -> None:
    """on_error: fail: a result the console cannot unpickle ends the job like a remote error
    (the server counted it a success): the job is killed and the run fails naming it."""
    stream, sink, client, error = _unreadable_one_each("fail")
    assert client.killed == [4]
    assert isinstance(error, JobFailed) and "argument 1: ResultUnreadable" in str(error)
    assert sink.closed and sink.complete is False


def test_a_sink_that_cannot_write_fails_the_job_not_the_connection() -> None:
    """A sink raising (a full disk) while taking results: the job is killed and the run
    fails with the sink's own error; nothing reaches the connection's handler."""

    class FullDisk(ObjectSink):
        def add_results(self, indices: list[int], arguments: Any, results: list[Any]) -> None:
            raise OutputError("could not write out.jsonl.partial: disk full")

    stream, client = attached(5)
    sizes, payload = pack([1, 2])
    stream.results(m.Results(job=5, indices=[0, 1], sizes=sizes, errors=[], payload=payload))
    error = collect(stream, FullDisk())
    assert client.killed == [5]
    assert isinstance(error, OutputError) and "disk full" in str(error)


def test_an_os_error_while_saving_results_is_named_without_a_traceback(capsys) -> None:
    """An OSError no sink named (ENOSPC on a pipe or stdout) becomes one OutputError that
    says 'disk full'; the job is killed and no traceback is logged for it."""
    import errno

    from twisted.logger import globalLogPublisher

    class FullPipe(ObjectSink):
        def add_results(self, indices: list[int], arguments: Any, results: list[Any]) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        stream, client = attached(6)
        sizes, payload = pack([1])
        stream.results(m.Results(job=6, indices=[0], sizes=sizes, errors=[], payload=payload))
        error = collect(stream, FullPipe())
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert client.killed == [6]
    assert isinstance(error, OutputError)
    assert (
        str(error)
        == "job 6: this console could not write its results: disk full (no space left on device)"
    )
    # (only this run's own logs: another test's reactor thread may log meanwhile)
    assert not [
        e
        for e in logged
        if e.get("log_failure") is not None
        and str(e.get("log_namespace", "")).startswith("remap.client")
    ]


def test_a_remote_traceback_starts_at_the_users_frame_not_remaps_wrappers() -> None:
    """``Executor.submit`` and ``Pool`` calls go through remap's wrappers (``Apply``,
    ``Initialized``); their frames say nothing to the user, so the traceback starts at the
    user's own function, as it does for ``cluster.map``."""
    from remap.calls import Apply, Initialized, Initializer

    for fn in (Apply(odd_fails), Initialized(odd_fails, Initializer(int))):
        arg = ((1,), {}) if isinstance(fn, Apply) else 1
        reply, _ = run_batch(fn, [arg])
        ((_, _, _, tb),) = reply.errors
        first_frame = tb.splitlines()[1]
        assert "odd_fails" in first_frame, tb
        assert "calls.py" not in tb, tb


def test_a_core_enters_a_jobs_directory_only_when_it_shipped_one(tmp_path, monkeypatch) -> None:
    """Before a job's first batch a core looked on disk for the job's directory (an ``lstat``
    and a ``stat``); a job without a bundle has none: the core names no directory for it, as
    before, without looking. A job with a bundle still runs in its directory."""
    import os

    from remap import bundle
    from remap.node import core as core_module

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv(bundle.ENV, "stale")
    looked: list[int] = []
    real = core_module.enter_job
    monkeypatch.setattr(core_module, "enter_job", lambda job: (looked.append(job), real(job)))
    core = Core(mmap.mmap(-1, SLOT.size))
    where = lambda _: os.environ.get(bundle.ENV)  # noqa: E731
    core.load(m.CoreLoad(job=1, payload=function_blob(where)))
    shipped = bundle.wrap(function_blob(where), bundle.Bundle({}, {"d.txt": b"hi"}))
    core.load(m.CoreLoad(job=2, payload=shipped))
    os.environ[bundle.ENV] = "stale"  # (the bundle's install named its directory)
    sizes, payload = pack([0])
    for job, expected in ((1, None), (2, str(bundle.job_path(os.getppid(), 2))), (1, None)):
        reply = core.run(m.Task(task=9, job=job, sizes=sizes, payload=payload))
        assert pickle.loads(reply.payload) == [expected]  # (packed: a list of results)
    assert looked == [2]
    core.drop(2)
    assert core._bundled == set() and set(core.jobs) == {1}
