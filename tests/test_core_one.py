"""A core's batch of one bare argument (every lone ``submit``) takes a path of its own
(``Core._run_one``): it must answer exactly as the general loop answers the same call, which
a group of one argument still takes. No processes."""

from __future__ import annotations

import copyreg
import mmap
import pickle
import re
import sys
from typing import Any

import pytest

from protocol import messages as m
from remap.node import core as core_module
from remap.node.core import SLOT, Core
from remap.shipping import function_blob

#: the slot of the core under test, for functions that look at it while they run
SHM = mmap.mmap(-1, SLOT.size)


def plus_one(x: int) -> int:
    return x + 1


def talks(x: int) -> int:
    print("out", x)
    sys.stderr.write(f"err {x}\n")
    return x


def fails(x: int) -> int:
    raise ValueError(f"bad {x}")


def interrupts(x: int) -> int:
    raise KeyboardInterrupt


def exits(x: int) -> int:
    sys.exit(3)


def unpicklable(x: int) -> Any:
    return (x for _ in ())  # a generator: neither pickle nor cloudpickle takes it


class Unreadable(Exception):
    """Pickles, but does not unpickle (its __init__ wants two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raises_unreadable(x: int) -> int:
    raise Unreadable("a", "b")


def slot_now(x: int) -> tuple[int, int]:
    pos, _, span = SLOT.unpack_from(SHM, 0)
    return pos, span


def adds(a: int, b: int = 0) -> int:
    return a + b


def _reply(fn: Any, arg_blob: bytes, *, star: bool = False, group: bool = False) -> m.TaskResult:
    core = Core(SHM)
    core.load(m.CoreLoad(job=1, star=star, payload=function_blob(fn)))
    if group:  # the general loop: a group of one argument
        arg_blob = pickle.dumps([pickle.loads(arg_blob)])
        cmd = m.Task(task=7, job=1, sizes=[len(arg_blob)], groups=[1], payload=arg_blob)
    else:
        cmd = m.Task(task=7, job=1, sizes=[len(arg_blob)], payload=arg_blob)
    reply = core.run(cmd)
    assert sys.stdout is not core.output and sys.stderr is not core.output
    assert SLOT.unpack_from(SHM, 0)[0] == -1, "idle again"
    return reply


#: an object's address in its repr (an unpicklable result's, kept with its error)
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _masked(payload: bytes) -> str:
    """What a payload holds, with object addresses masked: an unpicklable result's repr names
    the address of an object each run makes again (the same one only if the allocator
    happens to reuse it, which a test order with other garbage about may not)."""
    value = pickle.loads(payload)
    return _ADDRESS.sub(" at 0x?", repr((value, getattr(value, "__dict__", None))))


def _same(fn: Any, arg: Any, *, star: bool = False) -> m.TaskResult:
    blob = pickle.dumps(arg)
    one, general = _reply(fn, blob, star=star), _reply(fn, blob, star=star, group=True)
    assert (one.task, one.sizes, one.packed, one.partial, one.part, one.output) == (
        general.task,
        general.sizes,
        general.packed,
        general.partial,
        general.part,
        general.output,
    )
    assert one.payload == general.payload or _masked(one.payload) == _masked(general.payload)
    assert [e[:3] for e in one.errors] == [e[:3] for e in general.errors]
    for mine, theirs in zip(one.errors, general.errors, strict=True):
        # the same user frames (the loop re-raises an unpickling error from another line)
        assert mine[3].splitlines()[-1] == theirs[3].splitlines()[-1]
    assert one.elapsed > 0
    return one


@pytest.mark.parametrize(
    ("fn", "arg"),
    [
        (plus_one, 1),
        (talks, 2),
        (fails, 3),
        (interrupts, 4),
        (exits, 5),
        (unpicklable, 6),
        (raises_unreadable, 7),
    ],
    ids=["value", "output", "error", "keyboard-interrupt", "system-exit", "unpicklable", "odd"],
)
def test_a_lone_argument_is_answered_as_the_general_loop_answers_it(fn: Any, arg: Any) -> None:
    reply = _same(fn, arg)
    if fn is talks:
        assert reply.output == "out 2\nerr 2\n"
    if fn in (fails, interrupts, exits, unpicklable, raises_unreadable):
        assert [e[0] for e in reply.errors] == [0]


@pytest.fixture
def tracebacks_pickle():
    """Exceptions pickle with their tracebacks, as once ``distributed`` or ``dask.multiprocessing``
    is imported (tblib's ``pickling_support.install()``; the fast loop imports it when it
    collects joblib's fetched suite); the previous picklers come back afterwards."""
    support = pytest.importorskip("tblib.pickling_support")
    saved = dict(copyreg.dispatch_table)
    support.install()
    yield
    copyreg.dispatch_table.clear()
    copyreg.dispatch_table.update(saved)


@pytest.mark.parametrize(
    ("fn", "arg", "star"),
    [(fails, 3, False), (interrupts, 4, False), (adds, 7, True)],
    ids=["error", "keyboard-interrupt", "bad-star-argument"],
)
def test_a_lone_call_answers_as_the_loop_when_tracebacks_pickle(
    tracebacks_pickle: None, fn: Any, arg: Any, star: bool
) -> None:
    """The pickled exception then carries its frames: the user's only (the core's frames are
    in a different function on each path, which made the lone reply 5 bytes longer)."""
    reply = _same(fn, arg, star=star)
    exc = pickle.loads(reply.payload)[0]
    tb = exc.__traceback__
    assert fn is adds or tb.tb_frame.f_code.co_filename == __file__
    assert fn is not adds or tb is None  # raised by the core's call itself: no frame of the user's


def test_star_arguments_of_a_lone_call() -> None:
    assert pickle.loads(_same(adds, (1, 2), star=True).payload) == [3]
    assert pickle.loads(_same(adds, {"a": 1, "b": 5}, star=True).payload) == [6]
    assert _same(adds, 7, star=True).errors[0][1] == "TypeError"


def test_an_argument_that_does_not_unpickle_fails_its_call() -> None:
    blob = b"\x80\x05not a pickle"
    one = _reply(plus_one, blob)
    assert [e[:2] for e in one.errors] == [[0, "UnpicklingError"]]
    core = Core(SHM)
    core.load(m.CoreLoad(job=1, payload=function_blob(plus_one)))
    general = core.run(m.Task(task=7, job=1, sizes=[len(blob)], groups=[1], payload=blob))
    assert [e[:3] for e in one.errors] == [e[:3] for e in general.errors]


def test_the_slot_names_the_lone_call_while_it_runs() -> None:
    """A crash or timeout during the call is blamed on position 0, span 1."""
    assert pickle.loads(_reply(slot_now, pickle.dumps(0)).payload) == [(0, 1)]


def test_a_lone_call_of_a_reduce_job_or_a_retry_takes_the_general_loop(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(Core, "_run_one", lambda self, cmd, fn, star: calls.append(cmd.task))
    core = Core(SHM)
    core.load(m.CoreLoad(job=1, payload=function_blob(plus_one)))
    core.load(m.CoreLoad(job=2, reduce=True, payload=function_blob(plus_one)))
    blob = pickle.dumps(1)
    reply = core.run(m.Task(task=1, job=2, sizes=[len(blob)], payload=blob))
    assert reply.partial and pickle.loads(reply.payload) == 2
    core.run(m.Task(task=2, job=1, sizes=[len(blob)], skip=1, payload=blob))
    core.run(m.Task(task=3, job=1, sizes=[len(blob)], payload=blob))
    assert calls == [3]


def test_output_written_between_batches_is_not_the_next_batchs() -> None:
    core = Core(SHM)
    core.load(m.CoreLoad(job=1, payload=function_blob(talks)))
    blob = pickle.dumps(1)
    first = core.run(m.Task(task=1, job=1, sizes=[len(blob)], payload=blob))
    second = core.run(m.Task(task=2, job=1, sizes=[len(blob)], payload=blob))
    assert first.output == second.output == "out 1\nerr 1\n"


def test_a_small_answer_the_pipe_takes_in_pieces_arrives_whole(monkeypatch) -> None:
    from protocol.framing import FrameDecoder
    from remap.node.core import write_frame

    out: list[bytes] = []

    def writev(fd: int, buffers: list[Any]) -> int:
        piece = bytes(memoryview(buffers[0])[:5])  # a pipe with room for 5 bytes at a time
        out.append(piece)
        return len(piece)

    monkeypatch.setattr(core_module.os, "writev", writev)
    answer = m.TaskResult(task=3, sizes=[4], elapsed=0.5, packed=True, payload=b"abcd")
    write_frame(4, answer)
    assert len(out) > 3
    (frame,) = FrameDecoder(1 << 20).feed(b"".join(out))
    assert m.decode(frame.header, frame.payload, channel="pipe") == answer


@pytest.mark.parametrize(
    "value",
    [1, -(2**70), 2.5, True, None, 1j, "text", b"bytes", "é" * 4096, [1, 2], {"a": 1}],
)
def test_a_lone_result_pickles_to_the_same_bytes_either_way(value: Any) -> None:
    from remap.blobs import dumps_buffered

    assert core_module._dumps_results([value]) == dumps_buffered([value])


def test_a_large_lone_result_is_pickled_through_a_buffer(monkeypatch) -> None:
    """``pickle.dumps`` grows its output by reallocation: a MiB result goes through
    ``dumps_buffered`` as before; only small plain values take the short way."""
    buffered: list[Any] = []
    real = core_module.dumps_buffered
    monkeypatch.setattr(
        core_module, "dumps_buffered", lambda obj: buffered.append(obj) or real(obj)
    )
    for value in (b"x" * (1 << 20), "y" * 5000, 1 << 40000, [1], 7, "short"):
        core_module._dumps_results([value])
    assert [type(v[0]) for v in buffered] == [bytes, str, int, list]


@pytest.mark.parametrize(
    ("error", "hint"),
    [(ModuleNotFoundError("No module named 'privmod'"), True), (ValueError("bad blob"), False)],
)
def test_a_function_a_node_cannot_import_says_how_to_ship_its_module(
    error: BaseException, hint: bool
) -> None:
    """A job whose function's module this node lacks fails each call with that error and how
    to ship the module (job file ``modules:``, ``modules=`` / ``remap.ship_by_value``), which
    the README's "Shipping your code" tells; other load errors get no such hint."""
    core = Core(SHM)
    core.jobs[5] = error
    task = m.Task(task=1, job=5, sizes=[1, 1], payload=b"ab")
    answer = core.run(task)
    assert [e[0] for e in answer.errors] == [0, 1]
    text = answer.errors[0][2]
    assert text.startswith("the job's function could not be loaded on this node: ")
    assert ("remap.ship_by_value(module)" in text and "modules:" in text) is hint
