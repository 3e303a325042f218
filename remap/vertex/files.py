"""Where a vertex job keeps its files in the data directory (``remap.data.layout``).

Every file is committed by rename (``write_atomic``), so a reader sees a whole file or none.
Scratch paths carry the epoch (bumped at every rollback, when the old epoch's files go) and a
worker makes no folder above its file's own, so one left over from before a rollback finds its
folders gone and stops: it never writes where a newer attempt reads, nor makes a folder again.

    job/<jobid>/jobconfig.json, consolidated-progress.json, result, result.json
    job/<jobid>/control/cmd-<seq>.pkl       the driver's commands, in order
    job/<jobid>/acks/<seq>/<slot>.pkl       each worker's answer to one command
    job/<jobid>/alive/<slot>.<attempt>      worker heartbeats (touched); driver.alive the driver's

A worker call's attempt is a number it claims by creating ``alive/<slot>.<n>`` exclusively
(O_EXCL, atomic on NFS too) with ``n`` above every attempt of its slot there: the newest
attempt of a slot is the highest number, whatever the clocks that dated the files say.

``acks/`` and ``alive/`` are made by the driver before it starts the workers and removed when
the job ends; a worker only writes inside them, so a call that starts (or goes on) after the
end finds them gone and stops, instead of leaving them behind.
    im/<jobid>/e<epoch>/load/to<p>/from<slot>-<chunk>      vertex records read by another worker
    im/<jobid>/e<epoch>/s<step>/to<p>/from<slot>-<chunk>   messages sent in superstep <step>
    im/<jobid>/e<epoch>/ckpt/s<step>/p<p>     partition p (and its inbox) before <step>; the
                                              last whole one moves to the next epoch
    <output's folder>/.<name>.remap-<jobid>/e<epoch>/out/part-<p>   the output, renamed whole
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.inputs import Split, compressed, read_line_blocks
from ..data.layout import TMP_SUFFIX, DataDir, remove_tree, write_atomic
from .engine import PICKLE_PROTOCOL


def heartbeat_name(name: str) -> tuple[int, int]:
    """``(slot, attempt)`` of a heartbeat file's name; ``(-1, -1)`` for any other file (the
    driver's, a stray)."""
    slot, dot, attempt = name.partition(".")
    if dot and (slot + attempt).isascii() and slot.isdigit() and attempt.isdigit():
        return int(slot), int(attempt)
    return -1, -1


class Heartbeats:
    """How long each heartbeat file has gone unchanged, by the observer's own clock. Its mtime
    comes from the file server's or the writer's clock, which on a LAN may be minutes off the
    observer's: only a change of it (or of its ctime or size) says the writer is alive, and the
    first sighting counts as one."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}  # path → (stat, since)

    def age(self, path: str, st: os.stat_result, now: float) -> float:
        """Seconds of the observer's clock (``now``) since ``path`` was last seen to change."""
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        seen = self._seen.get(path)
        if seen is None or seen[0] != stamp:
            self._seen[path] = (stamp, now)
            return 0.0
        return now - seen[1]


def write_pickle(path: Path, value: Any, *, parents: bool = True) -> None:
    """``parents=False``: see :func:`~remap.data.layout.write_atomic` (a worker's ack must not
    make ``acks/`` again after the job ended)."""
    write_atomic(path, pickle.dumps(value, PICKLE_PROTOCOL), parents=parents)


def read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def committed(directory: Path) -> list[Path]:
    """The committed files of a directory (no temporaries), in a stable order."""
    try:
        names = [n for n in os.listdir(directory) if not n.endswith(TMP_SUFFIX)]
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names, key=lambda n: (len(n), n))]


class Layout:
    """The paths of one vertex job inside a data directory."""

    def __init__(self, data: DataDir, job_id: str) -> None:
        self.root = data.job_dir(job_id)
        self.scratch = data.im_dir(job_id)
        self.acks = self.root / "acks"
        self.alive = self.root / "alive"
        self.driver_heartbeat = self.alive / "driver.alive"

    def remove_barriers(self) -> None:
        """Remove what only a running job needs, when it ends (its commands stay: a worker
        call starting late reads ``stop`` there)."""
        remove_tree(self.acks)
        remove_tree(self.alive)

    def command(self, seq: int) -> Path:
        return self.root / "control" / f"cmd-{seq:06d}.pkl"

    def ack(self, seq: int, slot: int) -> Path:
        return self.acks / f"{seq:06d}" / f"{slot}.pkl"

    def heartbeat(self, slot: int, attempt: int) -> Path:
        return self.alive / f"{slot}.{attempt}"

    def claim_attempt(self, slot: int) -> int:
        """The next attempt number of ``slot``, its heartbeat made: the one attempt that
        created the file owns the number (a racing retry moves on to the next).
        FileNotFoundError once ``alive/`` is gone (the job ended)."""
        taken = [a for s, a in map(heartbeat_name, os.listdir(self.alive)) if s == slot]
        attempt = max(taken, default=0) + 1
        while True:
            try:
                os.close(os.open(self.heartbeat(slot, attempt), os.O_CREAT | os.O_EXCL, 0o644))
                return attempt
            except FileExistsError:
                attempt += 1

    def epoch(self, epoch: int) -> Path:
        return self.scratch / f"e{epoch}"

    def loaded(self, epoch: int, partition: int) -> Path:
        return self.epoch(epoch) / "load" / f"to{partition}"

    def step(self, epoch: int, superstep: int) -> Path:
        return self.epoch(epoch) / f"s{superstep}"

    def inbox(self, epoch: int, superstep: int, partition: int) -> Path:
        """Messages sent in ``superstep`` to ``partition`` (read in the next superstep)."""
        return self.step(epoch, superstep) / f"to{partition}"

    def checkpoint(self, epoch: int, superstep: int) -> Path:
        return self.epoch(epoch) / "ckpt" / f"s{superstep}"

    def part_checkpoint(self, epoch: int, superstep: int, partition: int) -> Path:
        return self.checkpoint(epoch, superstep) / f"p{partition}"


def input_splits(paths: list[Path], pieces: int) -> list[list[tuple[int, str, int, int]]]:
    """Cut the input files into ``pieces`` runs of ``(file index, path, start, end)`` ranges
    of about equal size; a line belongs to the range its first byte is in."""
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    out: list[list[tuple[int, str, int, int]]] = [[] for _ in range(pieces)]
    pos = 0  # global byte position
    for i, (path, size) in enumerate(zip(paths, sizes)):
        if compressed(path):  # read whole, by the piece its first byte falls in
            if size:
                piece = min(pieces - 1, pos * pieces // max(total, 1))
                out[piece].append((i, str(path), 0, size))
            pos += size
            continue
        start = 0
        while start < size:
            piece = min(pieces - 1, (pos + start) * pieces // max(total, 1))
            piece_end = -(-(piece + 1) * total // pieces) - pos  # ceil, in this file's offsets
            end = min(size, max(piece_end, start + 1))
            out[piece].append((i, str(path), start, end))
            start = end
        pos += size
    return out


#: bytes read at a time by :func:`read_lines`
READ_BLOCK = 1 << 22


def read_lines(
    index: int, path: str, start: int, end: int, block: int = READ_BLOCK
) -> Iterator[str]:
    """The lines of one range of :func:`input_splits` without their line ends, read a block
    at a time (a load needs no line positions: its ranges are in input order)."""
    for _, lines in read_line_blocks(Split(index, path, start, end), block):
        yield from lines
