"""What a core's own Python costs for one ``Cluster.submit(f, x)`` call (a batch of one).

    python bench/core_calls.py [CALLS]                  # CPU µs and bytecodes per call
    CORE_CALLS_OPCODES=/tmp/cops python bench/core_calls.py   # + /tmp/cops.core.txt by function
    CORE_CALLS_SEQ=/tmp/cseq python bench/core_calls.py       # + /tmp/cseq.core.txt: one call's path

``bench/call_hops.py`` counts the server's and the node's Python; a core is a process of its
own that it does not see. This runs a core's command loop (``remap.node.core.serve``, as its
``main`` does) on a thread of this process, between two pipes, and feeds it the very
``core_load`` and ``task`` a node sent for one ``submit(now, 1)`` (captured once from an
embedded cluster), one command at a time, reading each answer before the next: as on a node,
every command arrives in a read of its own. Printed: the core thread's CPU per call
(``time.thread_time``, load-independent; includes its two pipe system calls) over CALLS calls
(default 3000), and the bytecodes it executes per call (``sys.settrace``, over 300 calls).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.call_hops import (  # noqa: E402
    _opcode_tracer,
    _sequence_tracer,
    _write_opcodes,
    _write_sequence,
)

COUNTED = 300


def _run_command() -> type:
    """What a node sends a core to run a batch: the server's ``task`` (``core_run`` in trees
    from before it was passed on as it came)."""
    from protocol import messages as m

    return getattr(m, "CoreRun", m.Task)


RUN = _run_command()


def now(_: Any) -> int:
    return time.perf_counter_ns()


def captured_commands() -> tuple[bytes, bytes]:
    """The ``core_load`` and ``task`` frames an embedded cluster's node sends a core for
    one ``submit(now, 1)``."""
    import remap
    from protocol import messages as m
    from protocol.framing import small_frame
    from remap.node import cores

    sent: dict[type, bytes] = {}
    original = cores.CoreProcess.send

    def send(self: Any, msg: Any) -> None:
        if type(msg) in (m.CoreLoad, RUN):
            sent[type(msg)] = small_frame(*m.encode(msg))
        original(self, msg)

    cores.CoreProcess.send = send  # type: ignore[method-assign]
    try:
        with remap.connect(cores=1, task_output=False) as cluster:
            cluster.submit(now, 1).result()
    finally:
        cores.CoreProcess.send = original  # type: ignore[method-assign]
    return sent[m.CoreLoad], sent[RUN]


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ, as the node widens its pipes
    return r, w


def _serve(core: Any, cmd_fd: int, out_fd: int) -> None:
    """The command loop of a core's ``main`` in trees from before ``serve`` (to compare)."""
    from protocol import messages as m
    from remap.node.core import commands, write_frame

    for cmd in commands(cmd_fd):
        t = type(cmd)
        if t is RUN:
            write_frame(out_fd, core.run(cmd))
        elif t is m.CoreLoad:
            core.load(cmd)


def run(load: bytes, command: bytes, calls: int, tracer: Any = None) -> float:
    """CPU seconds the core's thread spends per call over ``calls`` calls."""
    from protocol import messages as m
    from protocol.framing import FrameDecoder
    from remap.node import core as core_module
    from remap.node.core import SLOT, Core, write_frame

    serve = getattr(core_module, "serve", None) or _serve

    cmd_r, cmd_w = _pipe()
    out_r, out_w = _pipe()
    core = Core(mmap.mmap(-1, SLOT.size), emit=lambda result: write_frame(out_w, result))
    spent = [0.0]
    started = threading.Event()

    def loop() -> None:
        started.wait()
        if tracer is not None:
            sys.settrace(tracer)
        t0 = time.thread_time()
        try:
            serve(core, cmd_r, out_w)
        finally:
            spent[0] = time.thread_time() - t0
            sys.settrace(None)

    decoder = FrameDecoder(max_frame=1 << 30)
    # loaded and warmed outside the measured loop
    serve_thread = threading.Thread(target=serve, args=(core, cmd_r, out_w), daemon=True)
    serve_thread.start()
    os.write(cmd_w, load)
    for _ in range(20):
        os.write(cmd_w, command)
        decoder.feed(os.read(out_r, 1 << 16))
    os.close(cmd_w)
    serve_thread.join()
    cmd_r, cmd_w = _pipe()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    started.set()
    answers = 0
    for _ in range(calls):
        os.write(cmd_w, command)
        for frame in decoder.feed(os.read(out_r, 1 << 16)):
            msg = m.decode(frame.header, frame.payload, channel="pipe")
            assert type(msg) is m.TaskResult and not msg.errors, msg
            answers += 1
    os.close(cmd_w)
    thread.join()
    for fd in (cmd_r, out_r, out_w):
        os.close(fd)
    assert answers == calls
    return spent[0] / calls


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    calls = int(argv[0]) if argv else 3000
    load, command = captured_commands()
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    cpu = sorted(run(load, command, calls) for _ in range(3))
    print(f"core CPU per call: {cpu[1] * 1e6:6.1f} µs (median of 3 × {calls} calls)")
    opcodes: dict[str, int] = {}
    run(load, command, COUNTED, _opcode_tracer(opcodes))
    print(f"core bytecodes per call: {sum(opcodes.values()) / COUNTED:6.0f}")
    if prefix := os.environ.get("CORE_CALLS_OPCODES"):
        _write_opcodes(f"{prefix}.core.txt", opcodes, COUNTED)
        print(f"by function: {prefix}.core.txt")
    if prefix := os.environ.get("CORE_CALLS_SEQ"):
        seq: list[list[Any]] = []
        run(load, command, 1, _sequence_tracer(seq, [0]))
        _write_sequence(f"{prefix}.core.txt", seq)
        print(f"one call's path: {prefix}.core.txt")
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main(sys.argv[1:])
