"""The benchmark's task functions, input generators and expected answers.

Everything here is importable as ``bench.workloads`` from the repository root, so every
system (remap cores, Pool workers, Dask and Ray workers) finds the same functions by
reference; nothing here depends on the system that runs it.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ trivial calls


def inc(x: int) -> int:
    """The trivial call: all cost is the system's overhead."""
    return x + 1


def identity(x: Any) -> Any:
    """The 500-node workload's function; the simulated nodes echo instead of calling it."""
    return x


def double(x: int) -> int:
    return x + x


def add(a: Any, b: Any) -> Any:
    return a + b


def lazy_arguments(n: int) -> Iterator[int]:
    """A generator, so no system can cheat by taking ``len()`` of the arguments."""
    yield from range(n)


def lazy_expected(n: int) -> int:
    """sum(double(x) for x in range(n))."""
    return n * (n - 1)


# ------------------------------------------------------------------ CPU-bound calls


def spin(iterations: int) -> int:
    """Pure-Python integer work; returns a checksum so the loop cannot be skipped."""
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def burn(arg: tuple[int, int]) -> tuple[int, int]:
    """About 100 ms of CPU on one core (``iterations`` calibrated by :func:`calibrate_burn`)."""
    index, iterations = arg
    return index, spin(iterations + index % 7)


def burn_expected(index: int, iterations: int) -> tuple[int, int]:
    return index, spin(iterations + index % 7)


def calibrate_burn(seconds: float = 0.1) -> int:
    """Iterations of :func:`spin` that take ``seconds`` of CPU here (best of a few).

    CPU time, not wall time, so other load on the machine does not skew the calibration.
    """
    probe = 500_000
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        spin(probe)
        best = min(best, time.process_time() - t)
    return max(1000, int(probe * seconds / best))


# ------------------------------------------------------------------ 1 MiB payloads

MIB = 1024 * 1024


def reverse_bytes(data: bytes) -> bytes:
    """Return a new 1 MiB object, so the result really travels back."""
    return data[::-1]


def mib_arguments(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(MIB) for _ in range(count)]


# ------------------------------------------------------------------ word count

_BLOCK_BYTES = MIB
_FILE_BLOCKS = 4  # a file (one argument) is 4 MiB of text


def count_words(path: str) -> Counter:
    """Word frequencies of one file."""
    with open(path, "rb") as f:
        return Counter(f.read().split())


def merge_counts(a: Counter, b: Counter) -> Counter:
    a.update(b)
    return a


def _vocabulary(rng: random.Random, size: int = 5000) -> list[bytes]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < size:
        words.add("".join(rng.choices(letters, k=rng.randint(2, 10))).encode())
    return sorted(words)


def _block(rng: random.Random, vocab: list[bytes], cum_weights: list[float]) -> bytes:
    """About 1 MiB of lines of 12 words, ending at a line break."""
    words = rng.choices(vocab, cum_weights=cum_weights, k=_BLOCK_BYTES // 4)
    lines = [b" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return b"\n".join(lines)[:_BLOCK_BYTES].rsplit(b"\n", 1)[0] + b"\n"


def make_corpus(directory: Path, total_bytes: int, seed: int = 11) -> dict[str, Any]:
    """Write about ``total_bytes`` of synthetic text as 4 MiB files; return paths and the answer.

    Files are built from a few distinct 1 MiB blocks (Zipf-weighted words), so the exact
    expected word counts come from the blocks' counts, without counting 200 MB twice.
    """
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.json"
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        if meta.get("total_bytes") == total_bytes and meta.get("seed") == seed:
            return meta
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))
    blocks = [_block(rng, vocab, cum_weights) for _ in range(8)]
    block_counts = [Counter(b.split()) for b in blocks]
    expected: Counter = Counter()
    paths: list[str] = []
    written = 0
    index = 0
    while written < total_bytes:
        chosen = [rng.randrange(len(blocks)) for _ in range(_FILE_BLOCKS)]
        data = b"".join(blocks[i] for i in chosen)
        path = directory / f"part-{index:04d}.txt"
        path.write_bytes(data)
        for i in chosen:
            expected.update(block_counts[i])
        paths.append(str(path))
        written += len(data)
        index += 1
    with open(directory / "expected.pickle", "wb") as f:
        pickle.dump(expected, f)
    meta = {
        "total_bytes": total_bytes,
        "seed": seed,
        "bytes": written,
        "paths": paths,
        "expected": str(directory / "expected.pickle"),
    }
    manifest.write_text(json.dumps(meta))
    return meta


def corpus_expected(meta: dict[str, Any]) -> Counter:
    with open(meta["expected"], "rb") as f:
        return pickle.load(f)


# ------------------------------------------------------------------ helpers for peers


def apply_chunk(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """Map ``fn`` over one chunk: how Dask gets Pool-like batching for tiny calls."""
    return [fn(x) for x in items]


def fold_chunk(
    fn: Callable[[Any], Any], reduce_fn: Callable[[Any, Any], Any], items: list[Any]
) -> Any:
    it = iter(items)
    acc = fn(next(it))
    for x in it:
        acc = reduce_fn(acc, fn(x))
    return acc


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def pool_chunksize(n: int, workers: int) -> int:
    """multiprocessing.Pool.map's own default, used for every peer that needs a chunk size."""
    size, extra = divmod(n, workers * 4)
    return max(1, size + bool(extra))


def env_for_children() -> dict[str, str]:
    """This process's environment minus REMAP_*, with the repository on PYTHONPATH."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
