"""Data jobs against their peers: one command, one table.

    python bench/datajobs.py [--mb 200] [--big-gb 2] [--sort-records 10000000]
                             [--only wordcount,spill,sort] [--dir DIR] [--quick]

``--quick`` is a smaller run of everything (50 MB, 0.5 GB, 10^6 records) for a busy machine.

- ``wordcount``: word count of ~``--mb`` MB of the King James Bible (Debian's ``bible-kjv``:
  ``apt-get install bible-kjv``; its ``bible`` program prints the text), replicated into
  files of 16 MB, on an embedded remap cluster with 2 cores, against a serial Python loop with
  the same tokenizer, GNU ``tr | sort --parallel=2 | uniq -c`` (LC_ALL=C), and Dask bag
  (``read_text().str.split().flatten().frequencies()``, a local cluster of 2 one-thread worker
  processes) when dask is installed. remap runs the two shipped examples and per-word pairs
  without a combiner. Every result but Dask's (a different tokenizer) is checked against the
  serial loop's.
- ``spill``: the same word count with ``spill_mb: 8`` on ``--big-gb`` GB: the peak RSS (VmHWM)
  of every process — the bench process (the embedded cluster's server, node and console, which
  also runs the driver) and each core — against the 300 MB target.
- ``sort``: ``--sort-records`` 100-byte records (10-byte random key, TeraSort-style) sorted
  with a range partitioner from a sample, against ``LC_ALL=C sort --parallel=2``; the
  concatenated reducer files must equal GNU sort's output byte for byte.

Ratios are against the serial loop (word count) and GNU sort (sort) in the same run. Load from
other processes on the machine changes every wall-clock figure: the 1-minute load average is
printed beside each, and so is the CPU time every process of the run used (the bench process,
its children and theirs), which load changes much less.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import remap  # noqa: E402

WORD = re.compile(r"[a-z']+")
CORES = 2
RSS_TARGET_MB = 300

EXAMPLES = ROOT / "examples" / "mapreduce"
#: the shipped examples the bench runs: (row label, module file)
WORDCOUNT_EXAMPLES = (
    ("per-word pairs + combiner (wordcount.py)", "wordcount.py"),
    ("map_batch + in-mapper combining (wordcount_inmapper.py)", "wordcount_inmapper.py"),
)
#: per-word pairs without a combiner: every pair goes through the spill, the merge and reduce
WORDCOUNT_PAIRS = """\
import re

WORD = re.compile(r"[a-z']+")


def map(line):
    for word in WORD.findall(line.lower()):
        yield word, 1


def reduce(word, counts):
    yield word, sum(counts)
"""
#: the target of issue 11: word count at least this many times the serial loop's speed
TARGET_VS_SERIAL = 1.7

SORT_MODULE = """\
import bisect

BOUNDS = {bounds!r}


def map(line):
    yield line[:10], line[10:]


def partition(key, n):
    return bisect.bisect_right(BOUNDS, key)


def reduce(key, values):
    for value in values:
        yield key + value


def write(record, file):
    file.write(record + "\\n")
"""


class BenchError(Exception):
    pass


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Forget this process's peak RSS so far (Linux: ``5`` into ``clear_refs``), so the spill
    run's peak is its own, not that of earlier workloads in the same process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def load() -> float:
    return os.getloadavg()[0]


def tree_cpu() -> float:
    """CPU seconds used so far by this process, its live descendants, and reaped children."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return total


class Measured:
    """Wall and CPU seconds of a block (CPU of the whole process tree)."""

    def __enter__(self) -> Measured:
        self.wall, self.cpu = time.perf_counter(), tree_cpu()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = tree_cpu() - self.cpu


# ------------------------------------------------------------------ inputs


def bible_text() -> str:
    if shutil.which("bible") is None:
        raise BenchError("the corpus needs Debian's bible-kjv: apt-get install bible-kjv")
    out = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    )
    return out.stdout


def corpus(root: Path, megabytes: float, file_mb: int = 16) -> list[Path]:
    """The Bible replicated into files of ``file_mb`` MB until ``megabytes`` MB (cached)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".complete-{megabytes:g}"
    files = sorted(root.glob("kjv-*.txt"))
    if marker.exists():
        return files
    for f in files:
        f.unlink()
    text = bible_text()
    per_file = max(1, int(file_mb * 1e6 // len(text)))
    total = int(megabytes * 1e6)
    written = n = 0
    while written < total:
        copies = min(per_file, -(-(total - written) // len(text)))
        path = root / f"kjv-{n:04d}.txt"
        path.write_text(text * copies)
        written += copies * len(text)
        n += 1
    marker.write_text("")
    return sorted(root.glob("kjv-*.txt"))


def read_counts(output: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for part in (output / "default").iterdir():
        for line in part.read_text().splitlines():
            word, n = line.split("\t")
            counts[word] = int(n)
    return counts


# ------------------------------------------------------------------ runs


def run_serial(files: list[Path]) -> tuple[Measured, Counter[str]]:
    counts: Counter[str] = Counter()
    with Measured() as took:
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    counts.update(WORD.findall(line.lower()))
    return took, counts


def run_serial_blocks(files: list[Path]) -> tuple[Measured, Counter[str]]:
    """The serial loop with map_batch's batching (16 KiB of lines a call), on one core."""
    counts: Counter[str] = Counter()
    with Measured() as took:
        for path in files:
            with open(path, encoding="utf-8") as f:
                while lines := f.readlines(1 << 14):
                    counts.update(WORD.findall("".join(lines).lower()))
    return took, counts


def run_gnu_wordcount(files: list[Path]) -> tuple[Measured, Counter[str]]:
    script = (
        "cat \"$@\" | tr 'A-Z' 'a-z' | tr -cs \"a-z'\" '\\n' | sort --parallel=2 -S 25% | uniq -c"
    )
    with Measured() as seconds:
        out = subprocess.run(
            ["bash", "-c", script, "wc", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    counts: Counter[str] = Counter()
    for line in out.stdout.splitlines():
        n, _, word = line.strip().partition(" ")
        if word:
            counts[word] = int(n)
    return seconds, counts


def run_dask(files: list[Path]) -> Measured | None:
    try:
        import dask.bag as db
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return None
    with LocalCluster(
        n_workers=CORES, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:
            client.run(lambda: None)  # the workers are up and answering before the clock
            db.from_sequence(
                ["warm up"], npartitions=1
            ).str.split().flatten().frequencies().compute()
        with Client(cluster), Measured() as took:
            db.read_text(
                [str(f) for f in files], blocksize="16MB"
            ).str.split().flatten().frequencies().compute()
    return took


def run_remap(
    cluster: remap.Cluster, module: Any, inputs: Any, work: Path, **options: Any
) -> tuple[Measured, dict[str, Any], Path]:
    output = work / f"out-{time.monotonic_ns()}"
    with Measured() as took:
        summary = cluster.mapreduce(module, inputs, output, data_dir=str(work / "data"), **options)
    return took, summary, output


def example_module(name: str) -> Any:
    """A shipped example module, imported from ``examples/mapreduce``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", EXAMPLES / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def module_from(text: str, path: Path) -> Any:
    import importlib.util

    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ workloads


def bench_wordcount(args: argparse.Namespace, work: Path, rows: list[list[str]]) -> None:
    files = corpus(work / "corpus", args.mb)
    size = sum(f.stat().st_size for f in files) / 1e6
    dask_took: Measured | None = None

    def row(system: str, took: Measured | None, details: str = "") -> None:
        if took is None:
            rows.append(["wordcount", system, "not installed", "", "", f"{load():.1f}"])
            return
        text = (
            f"CPU {took.cpu:.1f} s ({took.cpu / size * 100:.2f} s/100 MB), "
            f"{size / took.wall:.1f} MB/s{details}"
        )
        ratio = f"{serial.wall / took.wall:.2f}"
        rows.append(["wordcount", system, f"{took.wall:.1f} s", ratio, text, f"{load():.1f}"])

    serial, expect = run_serial(files)
    row(f"serial Python loop (the reference), {size:.0f} MB", serial)
    block, counts = run_serial_blocks(files)
    if counts != expect:
        raise BenchError("WRONG RESULT: the block-at-a-time loop differs from the serial loop")
    row("serial loop, 16 KiB blocks (map_batch's batching on one core)", block)
    gnu_s, gnu = run_gnu_wordcount(files)
    if gnu != expect:
        raise BenchError("WRONG RESULT: GNU word count differs from the serial loop")
    row("GNU tr|sort --parallel=2|uniq -c", gnu_s)
    remap_runs: list[tuple[str, Measured]] = []
    with remap.connect(cores=CORES, env_file=None) as cluster:
        warm_up(cluster, work)
        modules = [(label, example_module(name)) for label, name in WORDCOUNT_EXAMPLES]
        pairs = module_from(WORDCOUNT_PAIRS, work / "wordcount_pairs.py")
        for label, module in [*modules, ("per-word pairs, no combiner", pairs)]:
            name = module.__name__
            seconds, summary, output = run_remap(
                cluster, module, work / "corpus", work, reducers=CORES, split_mb=16, spill_mb=64
            )
            if read_counts(output) != expect:
                raise BenchError(f"WRONG RESULT: remap word count ({name}) differs from serial")
            shutil.rmtree(output)
            t = summary["timings"]
            remap_runs.append((label, seconds))
            row(
                f"remap embedded, {CORES} cores, {label}",
                seconds,
                f"; map {t['map']:.1f} s, reduce {t['reduce']:.1f} s, {summary['splits']} splits",
            )
    dask_took = run_dask(files)
    row("dask bag (str.split tokenizer)", dask_took)
    best_label, best = min(remap_runs, key=lambda run: run[1].wall)
    ratio = serial.wall / best.wall
    verdict = "met" if ratio >= TARGET_VS_SERIAL else "NOT met"
    if dask_took is not None:
        ahead = dask_took.wall / best.wall
        verdict += f"; {ahead:.2f}× Dask bag's speed ({'ahead' if ahead > 1 else 'BEHIND'})"
    rows.append(
        [
            "wordcount",
            f"target: remap ≥ {TARGET_VS_SERIAL}× serial and ahead of Dask bag",
            "",
            f"{ratio:.2f}",
            f"{verdict} (best remap row: {best_label})",
            f"{load():.1f}",
        ]
    )
    for label, seconds in remap_runs:
        if dask_took is not None:
            rows.append(
                [
                    "wordcount",
                    f"remap {label} vs dask bag",
                    "",
                    f"{dask_took.wall / seconds.wall:.2f}",
                    f"> 1: remap ahead (CPU {dask_took.cpu / seconds.cpu:.2f}× less)",
                    f"{load():.1f}",
                ]
            )


def warm_up(cluster: remap.Cluster, work: Path) -> None:
    """One tiny data job first, outside the timed runs: the cores import the data-job code
    once, as a long-running cluster has (starting the cluster is outside them too)."""
    tiny = work / "warm-up"
    tiny.mkdir(parents=True, exist_ok=True)
    (tiny / "in.txt").write_text("in the beginning\n")
    _, _, output = run_remap(cluster, example_module("wordcount.py"), tiny / "in.txt", work)
    shutil.rmtree(output)


def bench_spill(args: argparse.Namespace, work: Path, rows: list[list[str]]) -> None:
    big = work / "big"
    files = corpus(big, args.big_gb * 1000, file_mb=64)
    size = sum(f.stat().st_size for f in files) / 1e6
    module = example_module("wordcount.py")
    import gc

    gc.collect()
    fresh = reset_peak_rss()
    with remap.connect(cores=CORES, env_file=None) as cluster:
        seconds, summary, output = run_remap(
            cluster, module, big, work, reducers=CORES, split_mb=64, spill_mb=8
        )
        cores = children(os.getpid())
        peaks = {pid: peak_rss_mb(pid) for pid in cores}
        own = peak_rss_mb(os.getpid()) or 0.0
        shutil.rmtree(output)
    core_peaks = ", ".join(f"{v:.0f}" for v in peaks.values() if v)
    worst = max([own, *(v for v in peaks.values() if v)])
    verdict = "under" if worst < RSS_TARGET_MB else "OVER"
    rows.append(
        [
            "spill_mb 8",
            f"remap embedded, {size / 1000:.1f} GB",
            f"{seconds.wall:.1f} s",
            "",
            f"peak RSS: bench process (server+node+console+driver"
            f"{'' if fresh else ', and earlier workloads'}) {own:.0f} MB, cores "
            f"{core_peaks} MB: {verdict} {RSS_TARGET_MB} MB; spills "
            f"{summary['counters']['map_spills']}, CPU {seconds.cpu:.0f} s",
            f"{load():.1f}",
        ]
    )


def bench_sort(args: argparse.Namespace, work: Path, rows: list[list[str]]) -> None:
    n = args.sort_records
    src = work / f"sort-{n}.txt"
    rng = random.Random(42)
    alphabet = string.ascii_letters + string.digits
    if not src.exists():
        with open(src, "w") as f:
            for i in range(n):
                key = "".join(rng.choices(alphabet, k=10))
                f.write(key + f"{i:010d}" + "x" * 79 + "\n")
    with open(src, encoding="ascii") as f:
        sample = sorted(line[:10] for line in f.read(101 * 20000).splitlines())
    reducers = CORES * 2
    bounds = [sample[len(sample) * k // reducers] for k in range(1, reducers)]
    module = module_from(SORT_MODULE.format(bounds=bounds), work / "sort_module.py")
    gnu_out = work / f"sort-{n}.gnu"
    with Measured() as gnu:
        subprocess.run(
            ["sort", "--parallel=2", "-S", "25%", "-o", str(gnu_out), str(src)],
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    rows.append(
        [
            "sort",
            f"GNU sort --parallel=2, {n:,} × 100 B",
            f"{gnu.wall:.1f} s",
            "1.00",
            f"CPU {gnu.cpu:.1f} s",
            f"{load():.1f}",
        ]
    )
    with remap.connect(cores=CORES, env_file=None) as cluster:
        took, summary, output = run_remap(
            cluster, module, src, work, reducers=reducers, split_mb=32, spill_mb=64
        )
    try:
        parts = sorted((output / "default").iterdir())
        if not same_bytes(parts, gnu_out):
            raise BenchError("WRONG RESULT: remap sort differs from GNU sort")
    finally:
        shutil.rmtree(output, ignore_errors=True)
        gnu_out.unlink(missing_ok=True)
    t = summary["timings"]
    rows.append(
        [
            "sort",
            f"remap embedded, {CORES} cores, {reducers} reducers",
            f"{took.wall:.1f} s",
            f"{took.wall / gnu.wall:.2f}× GNU's time",
            f"map {t['map']:.1f} s, reduce {t['reduce']:.1f} s, CPU {took.cpu:.1f} s "
            f"({took.cpu / gnu.cpu:.1f}× GNU's)",
            f"{load():.1f}",
        ]
    )


def same_bytes(parts: list[Path], whole: Path) -> bool:
    """Whether the concatenated ``parts`` equal ``whole``, compared a block at a time."""
    block = 1 << 20
    with open(whole, "rb") as expect:
        for part in parts:
            with open(part, "rb") as got:
                while chunk := got.read(block):
                    if expect.read(len(chunk)) != chunk:
                        return False
        return not expect.read(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200)
    parser.add_argument("--big-gb", type=float, default=2)
    parser.add_argument("--sort-records", type=int, default=10_000_000)
    parser.add_argument("--only", default="wordcount,spill,sort")
    parser.add_argument("--dir", help="keep inputs here between runs (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="50 MB, 0.5 GB, 10^6 records")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.big_gb, args.sort_records = 50, 0.5, 1_000_000
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="remap-databench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = Rows()
    try:
        for name in args.only.split(","):
            {"wordcount": bench_wordcount, "spill": bench_spill, "sort": bench_sort}[name](
                args, work, rows
            )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print(
            f"python bench/datajobs.py {' '.join(sys.argv[1:])}  (load average {os.getloadavg()})"
        )
        print_table(rows)
        shutil.rmtree(work / "data", ignore_errors=True)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


class Rows(list):
    """The table's rows; each is also printed (to stderr) as it is measured."""

    def append(self, row: list[str]) -> None:
        print(" | ".join(row), file=sys.stderr, flush=True)
        super().append(row)


def print_table(rows: list[list[str]]) -> None:
    head = ["workload", "system", "time", "ratio", "details", "load"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main())
