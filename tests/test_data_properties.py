"""Data jobs' map and reduce tasks in-process against a plain-Python reference, on random
inputs: keys of every kind (unicode, empty, NUL, lone surrogates from invalid UTF-8, very long,
numbers, bytes, tuples, pickled objects), a hot key on every line, empty files, files without a
trailing newline, CRLF, binary lines, compressed files (.gz, .bz2, .xz, .lzma); random split,
spill (down to one byte: a spill per record), fan-in, reducer counts, combiners and a
partitioner sending every key to one reducer.

The reference reads the files with ``bytes.split`` (not remap's reader), groups by ``==`` of
the encoded key, and sorts keys by their encoding: every key, the last of every reducer
included, with every value in input order (without a combiner)."""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from remap.data import inputs, layout
from remap.data.keys import default_partition, encode_key
from remap.data.layout import DataDir
from remap.data.tasks import TaskContext, functions_from, map_task, reduce_task

JOB = "20261202-000000-bbbbbb"
#: compressed suffixes, how to write them and read them back (the format goes by seed and file)
PACKERS = {
    ".gz": (gzip.compress, gzip.decompress),
    ".bz2": (bz2.compress, bz2.decompress),
    ".xz": (lzma.compress, lzma.decompress),
    ".lzma": (functools.partial(lzma.compress, format=lzma.FORMAT_ALONE), lzma.decompress),
}
#: keys a line's map may emit besides the line itself, drawn per seed
KEY_POOL: list[Any] = [
    "",
    "a",
    "\x00",
    "a\x00",
    "é",
    "日本",
    "\udc80",
    "k" * 3000,
    "tab\there",
    "new\nline",
    0,
    -1,
    255,
    -256,
    2**200,
    -(2**70),
    2**1100,
    0.5,
    -1.5,
    float("inf"),
    b"",
    b"\x00",
    b"\xff",
    ("a", 1),
    ("a",),
    (),
    None,
    True,
    False,
    [1, "z"],
    frozenset({3}),
]


def _line(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b""
    if kind == 1:  # binary, often invalid UTF-8
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))).replace(b"\n", b"")
    if kind == 2:
        return "é日\t ,".encode() * rng.randrange(1, 4)
    if kind == 3:
        return b"x" * rng.randrange(1, 3000)
    return rng.choice([b"a b", b"a", b"b c d", b"\r", b"a\r"])


def _reference_lines(data: bytes) -> list[str]:
    """A file's lines as the README says: split at LF, a CR before it dropped, no line after
    a final LF, bytes that are not UTF-8 as surrogate escapes."""
    parts = data.split(b"\n")
    last = parts.pop()
    lines = [p[:-1] if p.endswith(b"\r") else p for p in parts]
    if last:
        lines.append(last)
    return [p.decode("utf-8", "surrogateescape") for p in lines]


def _job_map(line: str):
    """A line, a hot key, and up to three pool keys chosen by the line's bytes."""
    r = random.Random(line.encode("utf-8", "surrogateescape"))
    yield "HOT", 1
    for _ in range(r.randrange(4)):
        yield KEY_POOL[r.randrange(len(KEY_POOL))], [line[:3], r.randrange(100)]
    yield line, 1


def _job_reduce(key, values):
    yield repr(key), repr(list(values))


def _job_combine(key, values):
    """Associative: counts add up, other values pass through (order kept)."""
    values = list(values)
    counts = [v for v in values if type(v) is int]
    rest = [v for v in values if type(v) is not int]
    return rest + ([sum(counts)] if counts else [])


def _one_reducer(key, n):
    return 0


def _normal(values: list[Any]) -> Any:
    """What a combiner leaves unchanged: the sum of the counts, the rest as a multiset."""
    counts = sum(v for v in values if type(v) is int)
    return counts, sorted(repr(v) for v in values if type(v) is not int)


def _run(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    files = []
    (tmp_path / "in").mkdir()
    for i in range(rng.randrange(1, 4)):
        sep = rng.choice([b"\n", b"\r\n"])
        data = sep.join(_line(rng) for _ in range(rng.randrange(0, 40)))
        if data and rng.random() < 0.5:
            data += sep
        path = tmp_path / "in" / f"f{i}"
        if rng.random() < 0.3:  # read decompressed, whole
            suffix = list(PACKERS)[(seed + i) % len(PACKERS)]  # the rng's draws stay the same
            path = path.with_name(f"f{i}{suffix}")
            data = PACKERS[suffix][0](data)
        path.write_bytes(data)
        files.append(path)
    reducers = rng.choice([1, 2, 3, 7])
    combine = rng.random() < 0.5
    one = rng.random() < 0.2
    spill = rng.choice([1, 50, 500, 1 << 20])
    fanin = rng.choice([2, 3, 64])
    total = sum(p.stat().st_size for p in files)
    split = max(rng.choice([3, 100, 1 << 20]), total // 60 + 1)  # at most ~60 map tasks
    data = DataDir(tmp_path / "data")
    layout.write_json(data.jobconfig(JOB), {})
    staging = tmp_path / "staging"
    (staging / "default").mkdir(parents=True)
    for r in range(reducers):
        data.run_dir(JOB, "default", r).mkdir(parents=True)
    namespace: dict[str, Any] = {"map": _job_map, "reduce": _job_reduce}
    if combine:
        namespace["combine"] = _job_combine
    if one:
        namespace["partition"] = _one_reducer
    ctx = TaskContext(
        str(data.root),
        JOB,
        {"default": reducers},
        spill,
        str(staging),
        functions_from(namespace, {"default": reducers}),
        fanin=fanin,
    )
    splits = inputs.make_splits(files, split, splittable=True)
    results = [map_task(ctx, (s.index, s.path, s.start, s.end)) for s in splits]
    got = {}
    for r in range(reducers):
        runs = [run[2] for res in results for run in res["runs"] if run[1] == r]
        done = reduce_task(ctx, (r, "default", r, runs))
        text = Path(done["path"]).read_text(encoding="utf-8", errors="surrogateescape")
        got[r] = [line.split("\t") for line in text.split("\n")[:-1]]  # reprs: no tab, no LF

    groups: dict[bytes, tuple[Any, list[Any]]] = {}
    for path in files:
        raw = path.read_bytes()
        if path.suffix in PACKERS:
            raw = PACKERS[path.suffix][1](raw)
        for line in _reference_lines(raw):
            for key, value in _job_map(line):
                groups.setdefault(encode_key(key), (key, []))[1].append(value)
    want: dict[int, list[tuple[str, list[Any]]]] = defaultdict(list)
    for encoded in sorted(groups):
        key, values = groups[encoded]
        r = 0 if one else default_partition(encoded, reducers)
        want[r].append((repr(key), values))
    where = f"seed {seed}: reducers {reducers} spill {spill} split {split} fanin {fanin}"
    for r in range(reducers):
        assert [k for k, _ in got[r]] == [k for k, _ in want[r]], f"{where} reducer {r}: keys"
        for (key, values), (_, shown) in zip(want[r], got[r]):
            seen = eval(shown)  # noqa: S307 - the repr of a list this test built
            if combine:
                assert _normal(seen) == _normal(values), f"{where}: key {key[:40]}"
            else:
                assert seen == values, f"{where}: key {key[:40]}"


@pytest.mark.parametrize("seed", range(16))
def test_random_jobs_equal_the_plain_python_reference(tmp_path: Path, seed: int) -> None:
    """Every key of every reducer (the last included), in encoded order, with every value in
    input order (the combined multiset with a combiner), whatever the sizes."""
    _run(tmp_path, seed)
