"""The floor under a single call on the server + node path: raw sockets, no remap, no Twisted.

    python bench/hop_floor.py [CALLS]

A small message goes the way ``cluster.submit(f, x).result()`` goes through ``api-procs``:
caller → TCP → "server" → TCP → "node" → pipe → "core", and back the same way. Each relay is
a Python process doing nothing but a blocking ``recv`` and a ``send`` per hop (what a reactor
does at the least), so the round trip is the wake-ups and the kernel's loopback path alone.
Beside it, the same message caller → pipe → "core" → pipe → caller (the two hops of
``multiprocessing.Pool``'s worker pipes, without its handler threads), and the TCP hops with
one relay removed, so each hop's cost can be read off. Prints p50 and p10 in µs per shape
and the CPU µs per call each process spent, with the load average.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

MESSAGE = b"x" * 120  # about a single call's frame (header + a small pickle)


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair with Nagle off, as remap's peers use."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _relay(up_read, up_write, down_read, down_write) -> None:  # noqa: ANN001
    """Forever: a message from upstream goes downstream, its answer back up."""
    while True:
        data = up_read()
        if not data:
            return
        down_write(data)
        answer = down_read()
        if not answer:
            return
        up_write(answer)


def _fork(body) -> int:  # noqa: ANN001
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shape(tcp_relays: int, calls: int) -> tuple[list[float], dict[str, float]]:
    """caller → ``tcp_relays`` TCP relays → a pipe "core" and back (0: caller ↔ core by pipes)."""
    pids = []
    # the core: reads its command pipe, answers on its result pipe
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    pids.append(_fork(lambda: _core(cmd_r, res_w)))
    os.close(cmd_r)
    os.close(res_w)
    down_read = lambda: os.read(res_r, 65536)  # noqa: E731
    down_write = lambda d: os.write(cmd_w, d)  # noqa: E731
    for _ in range(tcp_relays):
        mine, theirs = _pair()
        dr, dw = down_read, down_write
        pids.append(
            _fork(lambda s=theirs, dr=dr, dw=dw: _relay(lambda: s.recv(65536), s.sendall, dr, dw))
        )
        theirs.close()
        down_read = lambda s=mine: s.recv(65536)  # noqa: E731
        down_write = mine.sendall
    times = []
    for _ in range(200):
        down_write(MESSAGE)
        down_read()
    cpu0 = {pid: _cpu_of(pid) for pid in pids}
    me0 = time.process_time()
    for _ in range(calls):
        t = time.perf_counter_ns()
        down_write(MESSAGE)
        down_read()
        times.append((time.perf_counter_ns() - t) / 1000)
    cpu = {"caller": (time.process_time() - me0) / calls * 1e6}
    names = ["core"] + [f"relay {i + 1}" for i in range(tcp_relays)][::-1]
    for name, pid in zip(names, pids, strict=True):
        cpu[name] = (_cpu_of(pid) - cpu0[pid]) / calls * 1e6
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return times, cpu


def _core(cmd_r: int, res_w: int) -> None:
    while data := os.read(cmd_r, 65536):
        os.write(res_w, data)


def main(argv: list[str]) -> None:
    calls = int(argv[0]) if argv else 3000
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    labels = {
        0: "caller ↔ core by pipes (2 hops, Pool's worker pipes)",
        1: "caller → TCP relay → core (4 hops)",
        2: "caller → 2 TCP relays → core (6 hops: api-procs' path)",
    }
    for relays in (0, 1, 2):
        times, cpu = shape(relays, calls)
        p50 = statistics.median(times)
        p10 = sorted(times)[len(times) // 10]
        spent = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
        print(f"{p50:7.1f} µs p50 {p10:7.1f} µs p10  {labels[relays]}; CPU µs/call: {spent}")
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main(sys.argv[1:])
