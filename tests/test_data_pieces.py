"""The pure pieces of data jobs: key encoding, splits, line reading, spills and merges."""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import random
import re
import sys
import tracemalloc
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remap.data import inputs, keys, runs
from remap.errors import ConfigError

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 900), max_value=1 << 900)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
_keys = st.recursive(_scalars, lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3))


def _rank(key: object) -> tuple:
    """The documented order, computed the slow way: type rank, then the natural order."""
    if key is None:
        return (0,)
    if isinstance(key, bool):
        return (1, key)
    if isinstance(key, int):
        return (2, key)
    if isinstance(key, float):
        return (3, key)
    if isinstance(key, str):
        return (4, [ord(c) for c in key])
    if isinstance(key, bytes):
        return (5, list(key))
    return (6 if isinstance(key, tuple) else 7, [_rank(k) for k in key])


@given(_keys)
def test_keys_round_trip(key: object) -> None:
    """Every supported key decodes to an equal key of the same type."""
    back = keys.decode_key(keys.encode_key(key))
    assert back == key and type(back) is type(key)


@given(_keys, _keys)
@settings(max_examples=300)
def test_byte_order_is_the_documented_order(a: object, b: object) -> None:
    """Comparing encodings compares keys: type rank first, then the type's own order."""
    if repr(a) == repr(b):  # the same key (== alone would match (False,) and (0,))
        assert keys.encode_key(a) == keys.encode_key(b)
        return
    ra, rb = _rank(a), _rank(b)
    if ra == rb:  # e.g. 0.0 and -0.0: equal ranks, both orders fine
        return
    assert (keys.encode_key(a) < keys.encode_key(b)) == (ra < rb)


def test_other_keys_pickle_and_separators_survive() -> None:
    """Frozensets and keys full of separators round-trip; str fast path handles NULs."""
    for key in [frozenset({1, 2}), "a\tb,c\nd\x00e", ("x\x00", b"\x00\xff"), 1 << 2000]:
        assert keys.decode_key(keys.encode_key(key)) == key


def test_partition_is_stable_and_spread() -> None:
    """The default partitioner is a fixed function of the key bytes (not salted hash())."""
    assert keys.default_partition(keys.encode_key("hello"), 7) == keys.default_partition(
        keys.encode_key("hello"), 7
    )
    assert (
        keys.default_partition(keys.encode_key("hello"), 1 << 30) == 588977036
    )  # pinned: a change re-partitions old data
    counts = defaultdict(int)
    for i in range(7000):
        counts[keys.default_partition(keys.encode_key(f"w{i}"), 7)] += 1
    assert min(counts.values()) > 800


# ------------------------------------------------------------------ inputs


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 64, 10_000])
def test_every_line_read_once_whatever_the_split(tmp_path: Path, split: int) -> None:
    """Lines crossing split boundaries are read once, by the split they start in."""
    data = b"alpha\nbe\n\n\r\ngamma delta\nlast-without-newline"
    path = _write(tmp_path / "f.txt", data)
    got = []
    for s in inputs.make_splits([path], split, splittable=True):
        got.extend(inputs.read_lines(s))
    lines = ["alpha", "be", "", "", "gamma delta", "last-without-newline"]
    assert [line for _, line in got] == lines
    for offset, line in got:
        assert inputs.line_number(str(path), offset) == lines.index(line) + 1 or line == ""


def test_random_files_and_splits(tmp_path: Path) -> None:
    """Random contents and split sizes: the concatenated reads equal the file's lines."""
    rng = random.Random(7)
    for trial in range(30):
        parts = [
            "".join(rng.choice("ab \t,é") for _ in range(rng.randrange(0, 12)))
            for _ in range(rng.randrange(0, 40))
        ]
        text = "\n".join(parts) + rng.choice(["", "\n"])
        path = _write(tmp_path / f"r{trial}", text.encode())
        splits = inputs.make_splits([path], rng.randrange(1, 50), splittable=True)
        got = [line for s in splits for _, line in inputs.read_lines(s)]
        assert got == text.splitlines()


def test_finer_tail_cuts_the_last_wave_in_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last ``cores`` splits (big enough) are halved, in order and renumbered; every line
    is still read exactly once; small splits and zero cores change nothing."""
    rng = random.Random(11)
    files = []
    for i in range(3):
        text = "\n".join("w" * rng.randrange(0, 30) for _ in range(rng.randrange(20, 200)))
        files.append(_write(tmp_path / f"f{i}", text.encode()))
    expect = [line for f in files for line in f.read_text().splitlines()]
    splits = inputs.make_splits(files, 400, splittable=True)
    assert inputs.finer_tail(splits, 2) == splits  # each split is far below TAIL_MIN_BYTES
    assert inputs.finer_tail(splits, 0) == splits
    monkeypatch.setattr(inputs, "TAIL_MIN_BYTES", 50)
    for cores in (1, 2, 3, len(splits) + 4):
        finer = inputs.finer_tail(splits, cores)
        halved = [s for s in splits[-cores:] if s.size >= 100]
        assert len(finer) == len(splits) + len(halved)
        assert finer[: len(splits) - min(cores, len(splits))] == splits[:-cores]
        assert [s.index for s in finer] == list(range(len(finer)))
        assert [(s.path, s.start) for s in finer] == sorted(
            ((s.path, s.start) for s in finer), key=lambda ps: (files.index(Path(ps[0])), ps[1])
        )
        got = [line for s in finer for _, line in inputs.read_lines(s)]
        assert got == expect


def test_splits_skip_empty_files_and_keep_unsplittable_whole(tmp_path: Path) -> None:
    """An empty file has no split; ``splittable=False`` gives one split per file."""
    empty = _write(tmp_path / "e", b"")
    big = _write(tmp_path / "b", b"x\n" * 100)
    assert inputs.make_splits([empty], 10, splittable=True) == []
    assert len(inputs.make_splits([big], 10, splittable=True)) == 20
    whole = inputs.make_splits([empty, big], 10, splittable=False)
    assert [(s.start, s.end) for s in whole] == [(0, 200)]


def test_bad_utf8_survives(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are kept (surrogate escapes), not a crash."""
    path = _write(tmp_path / "bin", b"ok\n\xff\xfe\n")
    (split,) = inputs.make_splits([path], 100, splittable=True)
    lines = [line for _, line in inputs.read_lines(split)]
    assert lines[1].encode("utf-8", "surrogateescape") == b"\xff\xfe"


# ------------------------------------------------------------------ runs


def _pairs(records):
    """Run records ``(key, value, times)`` as the pairs they stand for."""
    return [(key, value) for key, value, times in records for _ in range(times)]


def _spill_all(records, spill_bytes, combine=None, tmp_path=None):
    """Feed records through a SpillBuffer; return the runs per bucket as lists of records."""
    out: dict[int, list[list[tuple[bytes, bytes, int]]]] = defaultdict(list)
    buffer = runs.SpillBuffer(
        spill_bytes,
        lambda bucket, recs: out[bucket[1]].append(list(recs)),
        lambda purpose, key, encoded: int(purpose),
        (lambda purpose: combine) if combine else None,
        purposes=[str(b) for b in range(3)],
    )
    for bucket, key, value in records:
        buffer.extend([(str(bucket), key, value)])
        if buffer.size >= buffer.spill_bytes:
            buffer.flush()
    buffer.flush()
    return out, buffer


def test_spills_are_sorted_and_bounded() -> None:
    """A small buffer spills often; each run is sorted; nothing is lost or reordered per key."""
    rng = random.Random(1)
    records = [(rng.randrange(3), rng.choice("abcdefgh"), i) for i in range(2000)]
    out, buffer = _spill_all(records, 4000)
    assert buffer.spills > 5
    for bucket, bucket_runs in out.items():
        for run in bucket_runs:
            assert [k for k, _, _ in run] == sorted(k for k, _, _ in run)
        merged = [(k, list(vs)) for k, vs in runs.grouped(runs.merge(iter(r) for r in bucket_runs))]
        want = defaultdict(list)
        for b, k, v in records:
            if b == bucket:
                want[k].append(v)
        assert merged == sorted(want.items())


def _allocated() -> int:
    """Bytes the traced allocations take, each rounded up to the small-object allocator's
    16-byte blocks (what RSS sees; tracemalloc reports the sizes asked for)."""
    return sum(-(-trace.size // 16) * 16 for trace in tracemalloc.take_snapshot().traces)


@pytest.mark.parametrize("combine", [None, lambda key, values: [len(list(values))]])
@pytest.mark.parametrize(
    "value",
    [lambda word, i: 1, lambda word, i: "seen " + word, lambda word, i: i / 7, lambda word, i: [i]],
    ids=["count", "text", "float", "pickled"],
)
def test_the_buffer_fills_its_budget_with_memory_not_estimates(value, combine) -> None:
    """The buffer's size is what its pairs really hold (tracemalloc): a word count's words from
    a skewed vocabulary, each a fresh text object as ``split`` makes, with counts, text, floats
    or pickled values, reach ``spill_bytes`` with their memory near the budget, not far below it (too
    many runs) nor above it."""
    rng = random.Random(5)
    vocabulary = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 9))) for _ in range(20000)]
    picks = rng.choices(range(len(vocabulary)), [1 / (i + 1) for i in range(20000)], k=150_000)
    budget = 1 << 20
    buffer = runs.SpillBuffer(budget, lambda b, r: None, lambda p, k, e: 0, lambda p: combine)
    tracemalloc.start()
    try:
        before = _allocated()
        for i, pick in enumerate(picks):
            word = vocabulary[pick]
            buffer.extend([((word + " ")[:-1], value(word, i))])
            if buffer.size >= budget:
                break
        held = _allocated() - before
    finally:
        tracemalloc.stop()
    assert buffer.size >= budget and 0.85 < held / budget < 1.15, (i, held / budget)


def test_combine_runs_per_spill_and_early() -> None:
    """combine folds each key's values in a spill (and early for hot keys); sums are right."""

    def combine(key, values):
        yield sum(values)

    records = [(0, "hot", 1)] * 5000 + [(0, "cold", 2)] * 3
    out, _ = _spill_all(records, 1 << 30, combine)
    (run,) = out[0]
    assert [(keys.decode_key(k), keys.decode_value(v)) for k, v in _pairs(run)] == [
        ("cold", 6),
        ("hot", 5000),
    ]


def test_mutable_values_are_captured_when_emitted() -> None:
    """A list value mutated after it was emitted is spilled as it was when emitted."""
    value = [1]
    out: list = []
    buffer = runs.SpillBuffer(
        1 << 20, lambda b, recs: out.extend(recs), lambda p, k, e: 0, purposes=["p"]
    )
    buffer.extend([("p", "k", value)])
    value.append(2)
    buffer.flush()
    assert keys.decode_value(out[0][1]) == [1]


def test_run_files_round_trip_and_truncation(tmp_path: Path) -> None:
    """Run files hold exactly what was written; a cut file is an error."""
    records = [(keys.encode_key(i), keys.encode_value("v" * i), 1) for i in range(100)]
    path = tmp_path / "run"
    assert runs.write_run(path, records)[0] == 100
    assert list(runs.read_run(path)) == records
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        list(runs.read_run(path))


@pytest.mark.parametrize("fanin", [2, 3, 5, 64])
def test_premerge_bounds_fanin_and_keeps_order(tmp_path: Path, fanin: int) -> None:
    """Many runs are pre-merged to at most ``fanin``; the result equals one big merge."""
    rng = random.Random(fanin)
    paths = []
    for n in range(23):
        recs = sorted(
            ((keys.encode_key(rng.randrange(50)), keys.encode_value((n, i)), 1) for i in range(30)),
            key=lambda r: r[0],
        )
        paths.append(str(tmp_path / f"run{n}"))
        runs.write_run(paths[-1], recs)
    expect = list(runs.merge(runs.read_run(p) for p in paths))
    left, merges = runs.premerge(paths, fanin, lambda i: tmp_path / f"scratch{i}")
    assert len(left) <= fanin and (merges > 0) == (fanin < 23)
    assert list(runs.merge(runs.read_run(p) for p in left)) == expect
    scratch = {p.name for p in tmp_path.iterdir() if p.name.startswith("scratch")}
    assert scratch == {Path(p).name for p in left if "scratch" in p}


def test_grouped_reduces_the_last_key_and_skips_unread_values() -> None:
    """Every key is grouped, the last included, even when reduce reads no values."""
    stream = iter(
        [(keys.encode_key(k), keys.encode_value(v), 1) for k, v in [("a", 1), ("a", 2), ("b", 3)]]
    )
    assert [k for k, _ in runs.grouped(stream)] == ["a", "b"]


def test_grouped_secondary_sort() -> None:
    """With ``group``, keys (g, x) group by g and values come in x order."""
    pairs = sorted(
        [(("g1", -5), "e"), (("g1", -9), "n"), (("g2", 1), "o"), (("g1", -7), "s")],
        key=lambda kv: keys.encode_key(kv[0]),
    )
    stream = iter([(keys.encode_key(k), keys.encode_value(v), 1) for k, v in pairs])
    got = [(g, list(vs)) for g, vs in runs.grouped(stream, group=lambda k: k[0])]
    assert got == [("g1", ["n", "s", "e"]), ("g2", ["o"])]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("word", "must yield (key, value) or (purpose, key, value) tuples, got 'word'"),
        (("k", 1, 2, 3), "tuples, got ('k', 1, 2, 3)"),
        (("nope", "k", 1), "purpose 'nope', but the job's reducer sets are default, lengths"),
    ],
)
def test_bad_map_output_is_named(out: object, message: str) -> None:
    """What map yields is checked: shape and purpose, with the value in the message."""
    buffer = runs.SpillBuffer(
        1 << 20, lambda b, r: None, lambda p, k, e: 0, purposes=["default", "lengths"]
    )
    with pytest.raises(runs.BadOutput) as info:
        buffer.extend([("ok", 1), out])
    assert message in str(info.value)
    assert buffer.records == 1  # what came before the bad output is kept and counted


def test_pairs_without_a_default_set_are_refused() -> None:
    """A (key, value) pair when every reducer set is named says to yield a purpose."""
    buffer = runs.SpillBuffer(1 << 20, lambda b, r: None, lambda p, k, e: 0, purposes=["a"])
    with pytest.raises(runs.BadOutput, match="no 'default' reducer set"):
        buffer.extend([("k", 1)])


# ------------------------------------------------------------------ the fast paths


@pytest.mark.parametrize("block", [1, 2, 5, 64, 1 << 20])
def test_line_blocks_read_what_read_lines_reads(tmp_path: Path, block: int) -> None:
    """Lines read a block at a time (decoded and cut in C) are the lines read one by one,
    whatever the split and block sizes, CRs and a last line without newline included; each
    block's offset is its first line's."""
    rng = random.Random(block)
    for trial in range(60):
        parts = [
            "".join(rng.choice("ab \t,é\r") for _ in range(rng.randrange(0, 12)))
            for _ in range(rng.randrange(0, 30))
        ]
        text = "\n".join(parts) + rng.choice(["", "\n", "\r\n", "\r"])
        path = _write(tmp_path / f"r{trial}", text.encode())
        for s in inputs.make_splits([path], rng.randrange(1, 40), splittable=True):
            one = list(inputs.read_lines(s))
            blocks = list(inputs.read_line_blocks(s, block))
            assert [line for _, lines in blocks for line in lines] == [line for _, line in one]
            starts = {offset for offset, _ in one}
            assert all(offset in starts for offset, lines in blocks if lines)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("start", [0, 3, 20])
def test_a_file_shorter_than_its_split_is_an_error_not_an_endless_loop(
    tmp_path: Path, start: int
) -> None:
    """A split planned over 100 bytes of a file that is now 8 long (truncated or rewritten
    while the job ran: a rotated log): the reader says so at once. It read empty blocks for
    ever, a map task or vertex worker spinning at full CPU (no task timeout by default)."""
    path = _write(tmp_path / "shrunk.txt", b"abc\ndef\n")
    with pytest.raises(inputs.InputChanged, match=r"is 8 bytes long, but was 100 or more"):
        list(inputs.read_line_blocks(inputs.Split(0, str(path), start, 100), 4))
    assert list(inputs.read_line_blocks(inputs.Split(0, str(path), 0, 8), 4)) == [
        (0, ["abc"]),
        (4, ["def"]),
    ]


#: what each compressed suffix is written with here (the standard library's compressors)
PACKERS = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".lzma": functools.partial(lzma.compress, format=lzma.FORMAT_ALONE),
}


@pytest.mark.parametrize("suffix", PACKERS)
def test_a_compressed_file_is_one_split_read_decompressed(
    tmp_path: Path, monkeypatch, suffix: str
) -> None:
    """A .gz, .bz2, .xz or .lzma input is never cut (a split of it could not start
    mid-stream), nor its last wave halved; its lines are the decompressed file's, line numbers
    count them. It was read as raw compressed bytes: garbage lines, and an OK job (.gz until
    it was read through gzip, the others until they were read through one table)."""
    text = b"a b\r\nc a\n\xff x\n" * 5000 + b"last"
    plain = _write(tmp_path / "p.txt", text)
    packed = _write(tmp_path / f"p.txt{suffix}", PACKERS[suffix](text))
    want = [line for s in inputs.make_splits([plain], 1000, splittable=True)
            for _, line in inputs.read_lines(s)]  # fmt: skip
    (split,) = inputs.make_splits([packed], 100, splittable=True)
    assert (split.start, split.end) == (0, packed.stat().st_size)
    monkeypatch.setattr(inputs, "TAIL_MIN_BYTES", 10)
    assert inputs.finer_tail([split], 1) == [split]
    for block in (7, 1 << 20):
        got = [line for _, lines in inputs.read_line_blocks(split, block) for line in lines]
        assert got == want
    assert [line for _, line in inputs.read_lines(split)] == want
    assert inputs.line_number(str(packed), len(b"a b\r\nc a\n")) == 3


_FORMATS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".lzma": "lzma"}


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not compressed"])
@pytest.mark.parametrize("suffix", PACKERS)
def test_a_corrupt_compressed_file_is_one_line_naming_file_and_line(
    tmp_path: Path, suffix: str, damage: str
) -> None:
    """Bad compressed data (cut short, a byte flipped, or no such format at all) stops the
    read with an UnreadableInput naming the file, the format and the decompressed line and
    byte where it was found: the decompressor's bare EOFError, OSError or LZMAError named
    neither (a .gz's 'map task 0: EOFError: Compressed file ended before ...')."""
    text = b"".join(b"line %d of the input\n" % i for i in range(60_000))
    packed = bytearray(PACKERS[suffix](text))
    middle = len(packed) // 2
    if damage == "truncated":
        del packed[middle:]
    elif damage == "flipped":
        packed[middle] ^= 0xFF
    else:
        packed[:] = text[:1000]
    path = _write(tmp_path / f"in{suffix}", packed)
    (split,) = inputs.make_splits([path], 1 << 20, splittable=True)
    for read in (inputs.read_lines, lambda s: inputs.read_line_blocks(s, 4096)):
        with pytest.raises(inputs.UnreadableInput) as info:
            for _ in read(split):
                pass
        message = str(info.value)
        assert message.startswith(f"input {path}: corrupt or truncated {_FORMATS[suffix]} data")
        where = re.search(r"at (?:line (\d+), )?decompressed byte (\d+): \S", message)
        assert where, message
        line, offset = where.groups()
        if damage != "flipped":  # a flipped byte may decompress to garbage before a check fails
            assert line and int(line) == text[: int(offset)].count(b"\n") + 1, message
        assert "\n" not in message


class ZstdError(Exception):
    """The stand-in module's error class (as ``compression.zstd.ZstdError``)."""


class _XzAsZstd(lzma.LZMAFile):
    """A stand-in for ``compression.zstd``'s file, over xz data (Pythons before 3.14 have
    none): bad data raises the module's own ZstdError, as the real one does."""

    def read(self, size: int = -1) -> bytes:
        try:
            return super().read(size)
        except lzma.LZMAError as exc:
            raise ZstdError(str(exc)) from None


def _no_zstd(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "compression.zstd", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "backports.zstd", None)


def _assert_zstd_refused(path: Path) -> None:
    """No zstd module: the input is refused before a job starts, and a task reading it (a
    node without the module) says the same, naming what to install or do."""
    remedy = r"reading \.zst needs Python 3\.14\+ or `pip install backports\.zstd`.*zstd -d"
    with pytest.raises(ConfigError, match=rf"^input '{path.name}': {path}: {remedy}"):
        inputs.resolve_inputs(path.name, path.parent)
    (split,) = inputs.make_splits([path], 1 << 20, splittable=True)
    with pytest.raises(inputs.UnreadableInput, match=rf"^input {path}: {remedy}"):
        list(inputs.read_line_blocks(split))


def test_a_zst_input_is_read_through_compression_zstd_when_it_imports(
    tmp_path: Path, monkeypatch
) -> None:
    """``.zst`` goes through the one table like the standard library's formats, by
    ``compression.zstd`` (a stand-in here) when it imports: one split, the plain file's lines,
    its ZstdError named with file and line; when neither it nor ``backports.zstd`` imports,
    the input is refused in one line naming what to install or do."""
    monkeypatch.setitem(sys.modules, "compression.zstd", SimpleNamespace(open=_XzAsZstd))
    sys.modules["compression.zstd"].ZstdError = ZstdError
    text = b"".join(b"line %d\r\n" % i for i in range(20_000))
    plain = _write(tmp_path / "p.txt", text)
    packed = _write(tmp_path / "p.txt.zst", lzma.compress(text))
    assert inputs.resolve_inputs("p.txt.zst", tmp_path) == [packed.resolve()]
    (want,) = inputs.make_splits([plain], 1 << 20, splittable=True)
    (split,) = inputs.make_splits([packed], 1000, splittable=True)
    assert (split.start, split.end) == (0, packed.stat().st_size)
    assert list(inputs.read_line_blocks(split, 999)) == list(inputs.read_line_blocks(want, 999))
    broken = bytearray(packed.read_bytes())
    broken[len(broken) // 2] ^= 0xFF
    packed.write_bytes(broken)
    with pytest.raises(inputs.UnreadableInput, match="corrupt or truncated zstd data at line"):
        list(inputs.read_line_blocks(split))
    _no_zstd(monkeypatch)
    _assert_zstd_refused(packed)


def test_zst_inputs_per_python_version(tmp_path: Path) -> None:
    """On this Python as it is: 3.14+ (or an installed backports.zstd) reads a real .zst file
    as its plain text; before 3.14 without the backport, the one-line refusal."""
    text = b"".join(b"word %d\n" % i for i in range(5000))
    zstd = inputs._reader(inputs.FORMATS[".zst"])
    if zstd is None:
        assert sys.version_info < (3, 14), "Python 3.14+ has compression.zstd"
        _assert_zstd_refused(_write(tmp_path / "p.zst", b"(bytes no reader will see)"))
        return
    packed = _write(tmp_path / "p.zst", zstd.compress(text))
    (split,) = inputs.make_splits([packed], 100, splittable=True)
    assert [line for _, line in inputs.read_lines(split)] == text.decode().splitlines()
    packed.write_bytes(zstd.compress(text)[:-9])
    with pytest.raises(inputs.UnreadableInput, match=f"input {packed}: corrupt or truncated zstd"):
        list(inputs.read_line_blocks(split))


def test_a_python_without_lzma_refuses_xz_inputs_only(tmp_path: Path, monkeypatch) -> None:
    """The decompressors are imported when a file needs one: a Python built without
    ``_lzma`` refuses an .xz input in one line and still reads .gz and plain files (a
    top-level ``import lzma`` failed every data and vertex job)."""
    monkeypatch.setitem(sys.modules, "lzma", None)
    xz = _write(tmp_path / "a.xz", b"(no reader will see these bytes)")
    with pytest.raises(ConfigError, match=r"a\.xz: this Python was built without its lzma module"):
        inputs.resolve_inputs("a.xz", tmp_path)
    with pytest.raises(inputs.UnreadableInput, match=rf"^input {xz}: this Python was built"):
        list(inputs.read_lines(inputs.Split(0, str(xz), 0, 32)))
    _write(tmp_path / "b.gz", gzip.compress(b"x\n"))
    (split,) = inputs.make_splits(inputs.resolve_inputs("b.gz", tmp_path), 9, splittable=True)
    assert list(inputs.read_lines(split)) == [(0, "x")]


def test_a_plain_file_read_error_is_the_systems(tmp_path: Path, monkeypatch) -> None:
    """Only a compressed file's errors are renamed: a plain file's OSError is raised as it is
    (a disk's error, not bad data)."""
    path = _write(tmp_path / "in.txt", b"a\nb\n")

    class Failing(io.BufferedReader):
        def read(self, size: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(inputs, "_open_input", lambda p: (Failing(io.FileIO(p)), ()))
    with pytest.raises(OSError, match="Input/output error") as info:
        list(inputs.read_line_blocks(inputs.Split(0, str(path), 0, 4)))
    assert not isinstance(info.value, inputs.UnreadableInput)


def test_pairs_without_combine_keep_emission_order_with_mixed_keys() -> None:
    """Without a combiner the spill keeps each key's pairs in emission order: text, number,
    tuple and None keys come out in encoded order, each key's values in the order they were
    emitted."""
    out: list = []
    buffer = runs.SpillBuffer(1 << 20, lambda b, recs: out.extend(recs), lambda p, k, e: 0)
    emitted = [("b", 1), (2, "x"), ("a", [1]), ("b", 2), (None, 3), ((1, "t"), 4), (2, "y")]
    emitted += [("a", 5), ("é", 6), (1.5, 7)]
    buffer.extend(iter(emitted))
    buffer.flush()
    got = [(keys.decode_key(k), keys.decode_value(v)) for k, v in _pairs(out)]
    want = sorted(emitted, key=lambda kv: keys.encode_key(kv[0]))  # a stable sort
    assert got == want


def test_a_hot_key_folds_in_memory_instead_of_spilling() -> None:
    """When the buffer fills, combine folds each key first; it spills only if that did not
    free half of it. One hot key never spills; the sum is exact."""

    def combine(key, values):
        yield sum(values)

    out: list = []
    buffer = runs.SpillBuffer(
        4000, lambda b, recs: out.extend(recs), lambda p, k, e: 0, lambda p: combine
    )
    for _ in range(300):
        buffer.extend([("hot", 1)] * 10)
        if buffer.size >= buffer.spill_bytes:
            buffer.relieve()
    assert buffer.spills == 0
    buffer.flush()
    assert [(keys.decode_key(k), keys.decode_value(v)) for k, v in _pairs(out)] == [("hot", 3000)]
    assert buffer.records == 3000


def test_run_records_larger_than_a_read_block(tmp_path: Path) -> None:
    """A record bigger than the reader's block (text and pickled values) reads back whole."""
    big = "x" * (3 * runs._BUFFER + 17)
    records = [
        (keys.encode_key("a"), keys.encode_value(big), 1),
        (keys.encode_key("b"), keys.encode_value(b"y" * 5), 3),
        (keys.encode_key("c"), keys.encode_value([big]), 1),
    ]
    path = tmp_path / "run"
    runs.write_run(path, records)
    assert list(runs.read_run(path)) == records
    assert keys.decode_value(records[0][1]) == big


@given(st.lists(st.text(alphabet=st.characters(codec=None, exclude_categories=()))))
def test_text_order_is_the_order_of_text_encodings(texts: list[str]) -> None:
    """The spill sorts text keys as text: that must be the order of their encodings
    (surrogates and NULs included)."""
    assert sorted(texts) == sorted(texts, key=keys.encode_key)


@pytest.mark.parametrize("grouped", [False, True], ids=["pairs", "combine"])
def test_the_short_path_for_plain_pairs_buffers_what_the_general_one_does(grouped: bool) -> None:
    """``extend`` takes (text key, plain value) pairs by a short path (into the dict of key →
    values, with a combiner or without): any mix of keys and values spills the same records,
    and counts the same size, as the same records given as (purpose, key, value)."""

    def combine(key, values):
        yield list(values)

    rng = random.Random(3)
    values = [
        lambda: rng.choice("xyz") * rng.randrange(4),
        lambda: b"b" * rng.randrange(3),
        lambda: rng.randrange(5),
        lambda: 1.5,
        lambda: None,
        lambda: True,
        lambda: [1, 2],  # not plain: pickled at emission, by the general path
    ]
    pairs = [
        (rng.choice("abc") if rng.random() < 0.8 else rng.randrange(3), rng.choice(values)())
        for _ in range(300)
    ]

    def spilled(outputs: list) -> tuple[list, int]:
        out: list = []
        buffer = runs.SpillBuffer(
            1 << 30,
            lambda bucket, recs: out.append(
                [(keys.decode_key(k), keys.decode_value(v)) for k, v in _pairs(recs)]
            ),
            lambda purpose, key, encoded: 0,
            (lambda purpose: combine) if grouped else None,
        )
        buffer.extend(outputs)
        size = buffer.size
        buffer.flush()
        return out, size

    short = spilled(pairs)
    assert short == spilled([("default", k, v) for k, v in pairs])
    assert short[0] and short[1] > 0


def test_repeated_values_spill_and_group_as_themselves() -> None:
    """Spilling encodes each distinct int once and grouping decodes each distinct immutable
    pickle once: every value still comes back equal and of its own type (1, True and 1.0 stay
    apart), past the memo's bound too, and a mutable value is a fresh object per record."""
    rng = random.Random(3)
    pool = [1, True, 1.0, 0, False, None, -7, 2**70, b"x", ("t",), [1], {"d": 1}]
    values = [rng.choice(pool) for _ in range(3000)] + list(range(runs._MEMO + 50))
    rng.shuffle(values)
    records = [(0, rng.choice("abc"), v) for v in values]
    out, _ = _spill_all(records, 1 << 30)
    (run,) = out[0]
    by_key = defaultdict(list)
    for encoded, value in _pairs(run):
        by_key[keys.decode_key(encoded)].append(value)
    want = defaultdict(list)
    for _, k, v in records:
        want[k].append(v)
    for k, vs in want.items():  # byte for byte what encoding each value alone gives
        assert by_key[k] == [keys.encode_value(v) for v in vs]
    got = [(k, list(vs)) for k, vs in runs.grouped(iter(run))]
    assert got == sorted(want.items())
    for k, vs in got:
        assert [type(v) for v in vs] == [type(v) for v in want[k]]
        mutable = [v for v in vs if type(v) in (list, dict)]
        assert len({id(v) for v in mutable}) == len(mutable)


def test_premerge_reads_only_the_runs_over_the_fanin(tmp_path: Path) -> None:
    """23 runs with a fan-in of 20: one merge of the 4 smallest consecutive runs leaves 20, and
    the other 19 are left for the final merge (not all of them merged twice)."""
    paths = []
    for n in range(23):
        count = 5 if n in (9, 10, 11, 12) else 30
        recs = [(keys.encode_key(i), keys.encode_value(n), 1) for i in range(count)]
        paths.append(str(tmp_path / f"run{n}"))
        runs.write_run(paths[-1], recs)
    expect = list(runs.merge(runs.read_run(p) for p in paths))
    left, merges = runs.premerge(paths, 20, lambda i: tmp_path / f"scratch{i}")
    assert merges == 1 and len(left) == 20
    assert left[:9] == paths[:9] and left[10:] == paths[13:]
    assert len(list(runs.read_run(left[9]))) == 20
    assert list(runs.merge(runs.read_run(p) for p in left)) == expect


def test_equal_neighbouring_values_are_one_counted_record(tmp_path: Path) -> None:
    """A key's equal neighbouring values (a word count's 1s, without a combiner) are spilled
    as one record with their count, which the run file keeps; grouping gives every value
    back, in emission order, and a mutable value as an object of its own per pair."""
    out: list = []
    buffer = runs.SpillBuffer(1 << 20, lambda b, recs: out.extend(recs), lambda p, k, e: 0)
    emitted = [("the", 1)] * 1000 + [("the", 2)] + [("the", 1)] * 2 + [("a", [1])] * 3
    buffer.extend(emitted)
    buffer.flush()
    one, two, listed = keys.encode_value(1), keys.encode_value(2), keys.encode_value([1])
    the, a = keys.encode_key("the"), keys.encode_key("a")
    assert out == [(a, listed, 3), (the, one, 1000), (the, two, 1), (the, one, 2)]
    path = tmp_path / "run"
    assert runs.write_run(path, out) == (1006, path.stat().st_size)
    assert path.stat().st_size < 200  # 1006 records of a pair each would take 18 KB
    got = [(k, list(vs)) for k, vs in runs.grouped(runs.read_run(path))]
    assert got == [("a", [[1], [1], [1]]), ("the", [1] * 1000 + [2, 1, 1])]
    assert len({id(v) for v in got[0][1]}) == 3
