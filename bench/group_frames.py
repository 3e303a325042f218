"""Argument groups against nodes with small frames, through the public API.

A real server and one node whose ``REMAP_MAX_FRAME`` is small (``--node-frame``, default
256 KiB), the server and the client at the default: a ``map`` of many small arguments whose
sizes vary (so a group sized from the last one's bytes per argument can grow past the node's
frames), a lazy ``imap`` of the same, and a run of mid-size arguments. Prints, per workload,
how many results were right and how many arguments failed with ``ArgumentTooLarge``.

    python bench/group_frames.py [--node-frame 262144] [--n 20000]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node-frame", type=int, default=256 * 1024)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
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
