"""Argument groups against nodes with small frames, through the public API.

A real server and one node whose ``REMAP_MAX_FRAME`` is small (``--node-frame``, default
256 KiB), the server and the client at the default: a ``map`` of many small arguments whose
sizes vary (so a group sized from the last one's bytes per argument can grow past the node's
frames), a lazy ``imap`` of the same, and a run of mid-size arguments. Prints, per workload,
how many results were right and how many arguments failed with ``ArgumentTooLarge``.

    python bench/group_frames.py [--node-frame 262144] [--n 20000]
    python bench/group_frames.py --hol 200    # a large argument's wait for a busy large node
    python bench/group_frames.py --late --node-frame 32768   # a map submitted before any node
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import remap  # noqa: E402
from remap.settings import Settings  # noqa: E402
from tests.cluster_harness import Cluster, NodeSpec  # noqa: E402


def size_of(x: bytes) -> int:
    return len(x)


def workloads(n: int) -> dict[str, list[bytes]]:
    """Small arguments, a few bytes each, then a stretch of 6 KiB ones: a group sized from the
    small ones' bytes holds up to 128 of the larger (768 KiB); and uniform 3 KiB arguments
    (each its own object: pickle would otherwise keep one copy)."""
    ramp = [bytes([i % 251]) * 8 for i in range(n // 2)]
    ramp += [bytes([i % 251]) * 6144 for i in range(n // 2)]
    uniform = [bytes([i % 251]) * 3072 for i in range(n)]
    return {"ramp": ramp, "uniform": uniform}


def run(c: remap.Cluster, name: str, values: list[bytes], lazy: bool) -> str:
    """One map (a list, or a generator read lazily): right results, or the one-line error."""
    began = time.monotonic()
    right = 0
    try:
        if lazy:
            for value, got in zip(values, c.imap(size_of, iter(values)), strict=True):
                right += got == len(value)
        else:
            out = c.map(size_of, values)
            right = sum(got == len(v) for v, got in zip(values, out, strict=True))
    except remap.RemapError as exc:
        took = time.monotonic() - began
        return f"{name:<18} FAILED after {right} right results, {took:.2f} s: {str(exc)[:150]}"
    took = time.monotonic() - began
    return f"{name:<18} {right:>6} of {len(values)} right, {took:.2f} s"


def nap(x: bytes) -> int:
    time.sleep(0.02)
    return len(x)


def head_of_line(n: int) -> str:
    """Two nodes of one core, one taking frames of 64 KiB, one at the default; a map of ``n``
    calls of 20 ms in blocks of 50 whose first 10 arguments are 200 KiB (only the large node
    takes them): wall time."""
    values = [bytes([i % 251]) * (200 * 1024 if i % 50 < 10 else 64) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [
            NodeSpec(cores=1, env={"REMAP_MAX_FRAME": str(64 * 1024)}),
            NodeSpec(cores=1),
        ]
        with Cluster(tmp, nodes) as cluster:
            with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as c:
                began = time.monotonic()
                out = c.map(nap, values, chunksize=1)
                took = time.monotonic() - began
    right = sum(got == len(v) for v, got in zip(values, out, strict=True))
    ideal = n * 0.02 / 2
    return (
        f"head of line: {right} of {n} right in {took:.2f} s "
        f"(two cores, 20 ms calls: {ideal:.2f} s at best)"
    )


def late_node(n: int, node_frame: int) -> str:
    """A map of ``n`` arguments of 3 KiB submitted before any node, then one node at
    ``node_frame`` joins: right results, or the one-line error."""
    import threading

    values = [bytes([i % 251]) * 3072 for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        with Cluster(tmp, []) as cluster:
            with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as c:
                box: list[str] = []
                thread = threading.Thread(
                    target=lambda: box.append(run(c, "map before a node", values, lazy=False))
                )
                thread.start()
                cluster.wait_for(lambda: c.status()["jobs"], 30, "the job to be submitted")
                cluster.add_node(cores=2, env={"REMAP_MAX_FRAME": str(node_frame)})
                thread.join(120)
    return box[0] if box else "map before a node: no answer in 120 s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node-frame", type=int, default=256 * 1024)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--hol", type=int, default=0, help="only the head-of-line run, N calls")
    parser.add_argument("--late", action="store_true", help="only a map submitted before a node")
    args = parser.parse_args()
    if args.late:
        print(late_node(args.n, args.node_frame))
        return
    if args.hol:
        print(head_of_line(args.hol))
        return
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeSpec(cores=2, env={"REMAP_MAX_FRAME": str(args.node_frame)})
        with Cluster(tmp, [node]) as cluster:
            print(f"node REMAP_MAX_FRAME={args.node_frame:,}; server and client at the default")
            with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as c:
                for name, values in workloads(args.n).items():
                    print(run(c, f"map {name}", values, lazy=False), flush=True)
                    print(run(c, f"imap lazy {name}", values, lazy=True), flush=True)


if __name__ == "__main__":
    main()
