"""The scheduler alone: CPU microseconds per batch, no sockets, no processes, no reactor.

Fake links swallow what the scheduler sends; a ``task.Clock`` stands in for time. One job
of ``--args`` one-argument batches (``chunksize=1``) runs on ``--nodes`` nodes of
``--cores`` cores; each node answers every task it holds, round after round. The figure is
process CPU time over batches (each batch: a task sent, an answer handled, a result
delivered), so it is meaningful on a shared machine; the load average is printed beside it.

    python bench/scheduler_bench.py [--args 200000] [--nodes 50] [--cores 8] [--repeat 3]

Uses only the scheduler's long-standing calls (``add_node``, ``submit``, ``args_received``,
``args_ended``, ``task_result``), so the same file measures an older tree too
(``PYTHONPATH=/path/to/old/tree python bench/scheduler_bench.py``).
"""

from __future__ import annotations

import argparse
import os
import time

from twisted.internet.task import Clock

from protocol import messages as m
from remap.server.scheduler import Scheduler

ARG = b"\x80\x05K\x01."  # pickle of 1
RESULT = b"\x80\x05K\x02."


class Link:
    """Collects what is sent; the bench reads tasks and grants from it."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)

    def close(self, error: object = None) -> None:
        pass


def run(args: int, nodes: int, cores: int) -> tuple[float, int]:
    """CPU seconds and batches for one job of ``args`` one-argument batches."""
    sched = Scheduler(Clock())
    links = {}
    for i in range(nodes):
        link = links[f"n{i}"] = Link()
        sched.add_node(f"n{i}", link, m.NodeInfo(host=f"h{i}", pid=i, cores=cores, memory=1))
    console = Link()
    start = time.process_time()
    sched.submit(console, m.Submit(id=1, payload=b"fn", chunksize=1, total=args, name="bench"))
    job = console.sent[0].job
    granted, sent, ended, batches = console.sent[0].window, 0, False, 0
    while True:
        for msg in console.sent:
            if type(msg) is m.Grant:
                granted += msg.count
        console.sent.clear()
        n = min(granted - sent, args - sent, 10_000)
        if n > 0:
            sched.args_received(
                console, m.Args(job=job, start=sent, sizes=[len(ARG)] * n, payload=ARG * n)
            )
            sent += n
        if sent == args and not ended:
            ended = True
            sched.args_ended(console, m.ArgsEnd(job=job, total=args))
        moved = 0
        for node_id, link in links.items():
            tasks = [t for t in link.sent if type(t) is m.Task]
            link.sent.clear()
            for task in tasks:
                sched.task_result(
                    node_id, m.TaskResult(task=task.task, sizes=[len(RESULT)], payload=RESULT)
                )
                moved += 1
        batches += moved
        if not moved and ended:
            break
    return time.process_time() - start, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--args", type=int, default=200_000)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    best = min(run(opts.args, opts.nodes, opts.cores) for _ in range(opts.repeat))
    cpu, batches = best
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"scheduler: {batches} batches on {opts.nodes} nodes × {opts.cores} cores: "
        f"{cpu * 1e6 / batches:.1f} µs CPU per batch (best of {opts.repeat}; load {load})"
    )


if __name__ == "__main__":
    main()
