"""The map and reduce tasks in-process (no cluster): attempt naming, what reducers read,
user-code errors, hooks, and the data-directory check."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from remap.data import count, inputs, layout, tasks
from remap.data.layout import DataDir, StorageError
from remap.data.runs import BadOutput, CombineError, HookError
from remap.data.tasks import (
    JobCodeError,
    RecordError,
    TaskContext,
    functions_from,
    map_task,
    reduce_task,
)

JOB = "20261201-000000-aaaaaa"


def _wc_map(line: str):
    for word in line.split():
        yield word, 1


def _sum(key: Any, values: Any):
    yield key, sum(values)


def _context(tmp_path: Path, reducers: dict[str, int] | None = None, **fns: Any) -> TaskContext:
    reducers = reducers or {"default": 2}
    data = DataDir(tmp_path / "data")
    layout.write_json(data.jobconfig(JOB), {})
    staging = tmp_path / "staging"
    for purpose, n in reducers.items():
        (staging / purpose).mkdir(parents=True, exist_ok=True)
        for r in range(n):
            data.run_dir(JOB, purpose, r).mkdir(parents=True, exist_ok=True)
    namespace = {"map": _wc_map, "reduce": _sum, **fns}
    on_error = namespace.pop("on_error", "fail")
    return TaskContext(
        data_root=str(data.root),
        job_id=JOB,
        reducers=reducers,
        spill_bytes=1 << 20,
        output=str(staging),
        functions=functions_from(namespace, reducers),
        on_error=on_error,
    )


def _split(tmp_path: Path, text: str, index: int = 0) -> tuple[int, str, int, int]:
    path = tmp_path / f"in{index}.txt"
    path.write_text(text)
    return (index, str(path), 0, path.stat().st_size)


def _reduce_all(ctx: TaskContext, map_results: list[dict], purpose: str = "default") -> list[str]:
    lines = []
    for r in range(ctx.reducers[purpose]):
        paths = [
            p
            for res in map_results
            for (pu, rr, p, _, _) in res["runs"]
            if (pu, rr) == (purpose, r)
        ]
        result = reduce_task(ctx, (r, purpose, r, paths))
        lines.extend(Path(result["path"]).read_text().splitlines())
    return sorted(lines)


def test_attempts_commit_distinct_files_and_reducers_read_only_what_they_are_given(
    tmp_path: Path,
) -> None:
    """Two attempts of one mapper leave two committed sets of runs (distinct names); a reducer
    given one set counts each word once, whatever else lies in the directory."""
    ctx = _context(tmp_path)
    split = _split(tmp_path, "a b a\nc a\n")
    first, second = map_task(ctx, split), map_task(ctx, split)
    paths1 = {r[2] for r in first["runs"]}
    paths2 = {r[2] for r in second["runs"]}
    assert paths1.isdisjoint(paths2) and all(Path(p).exists() for p in paths1 | paths2)
    stray = Path(next(iter(paths1))).with_name("mapper-0000-part-00000.dead.w.tmp")
    stray.write_bytes(b"\x00\x00\x00")  # a killed attempt's partial run: never read
    assert _reduce_all(ctx, [first]) == ["a\t3", "b\t1", "c\t1"]
    assert first["counters"]["map_records_in"] == 2 and first["counters"]["map_records_out"] == 5


def test_reduce_output_is_attempt_named_until_the_driver_commits(tmp_path: Path) -> None:
    """A reduce attempt commits ``reducer-NNNN-part-00000.<attempt>``, never the final name."""
    ctx = _context(tmp_path, {"default": 1})
    result = reduce_task(
        ctx, (0, "default", 0, [r[2] for r in map_task(ctx, _split(tmp_path, "x"))["runs"]])
    )
    assert Path(result["path"]).name == f"reducer-0000-part-00000.{result['attempt']}"
    assert Path(result["final"]).name == "reducer-0000-part-00000"
    assert not Path(result["final"]).exists()
    assert sorted(p.name for p in (tmp_path / "staging" / "default").iterdir()) == [
        Path(result["path"]).name
    ]


def test_a_missing_data_directory_is_one_clear_error(tmp_path: Path) -> None:
    """A node that does not see the job's config refuses the task, naming the directory."""
    ctx = _context(tmp_path)
    DataDir(Path(ctx.data_root)).jobconfig(JOB).unlink()
    with pytest.raises(layout.DataDirNotShared, match="does not see the data directory"):
        map_task(ctx, _split(tmp_path, "a"))


def _picky_map(line: str):
    if line == "bad":
        raise ValueError("no good")
    count("good_lines")
    yield line, 1


def test_map_errors_name_file_and_line_or_are_counted(tmp_path: Path) -> None:
    """on_error fail: RecordError with file:line; continue: counted, listed, user counters kept."""
    split = _split(tmp_path, "ok\nbad\nok\n")
    with pytest.raises(RecordError, match=r"in0\.txt:2: map raised ValueError: no good"):
        map_task(_context(tmp_path, map=_picky_map), split)
    result = map_task(_context(tmp_path, map=_picky_map, on_error="continue"), split)
    assert result["counters"]["map_errors"] == 1 and result["counters"]["good_lines"] == 2
    assert result["errors"] == [f"{split[1]}:2: ValueError: no good"]


@pytest.mark.parametrize(
    ("fns", "message"),
    [
        ({"map": lambda line: iter(["plain"])}, "must yield (key, value)"),
        ({"map": lambda line: iter([("nope", "k", 1)])}, "purpose 'nope'"),
        ({"partition": lambda key, n: n}, "partition('a', 2) returned 2"),
    ],
)
def test_broken_contracts_fail_the_task(tmp_path: Path, fns: dict, message: str) -> None:
    """A wrong yield, an unknown purpose or a partition out of range fail even on continue."""
    ctx = _context(tmp_path, on_error="continue", **fns)
    with pytest.raises(JobCodeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        map_task(ctx, _split(tmp_path, "a\n"))


def _bad_on_line_two(line: str):
    yield (line, 1) if line != "b" else line


def test_a_broken_contract_names_file_and_line(tmp_path: Path) -> None:
    """A wrong yield names the record's file:line, as a raising map does (it named nothing)."""
    split = _split(tmp_path, "a\nb\nc\n")
    with pytest.raises(JobCodeError, match=r"in0\.txt:2: map must yield \(key, value\)"):
        map_task(_context(tmp_path, map=_bad_on_line_two), split)


@pytest.mark.parametrize(
    ("fns", "message"),
    [
        ({"map": lambda line: 1}, "in0.txt:1: map returned 1: it must yield (key, value) pairs"),
        ({"map": None, "map_batch": lambda lines: 2}, "map_batch returned 2: it must yield"),
        ({"map_final": lambda: 3}, "map_final returned 3: it must yield (key, value) pairs"),
        ({"combine": lambda key, values: None}, "combine('a', values) returned None: it must"),
        ({"combine": lambda key, values: sum(values)}, "combine('a', values) returned 1: it"),
    ],
)
def test_a_map_side_function_that_returns_no_records_is_named(
    tmp_path: Path, fns: dict, message: str
) -> None:
    """map, map_batch, map_final or combine returning something that is not an iterable (a
    missing yield) fails even on continue with a line naming the function and the value.
    Before: "map raised TypeError: 'int' object is not iterable" (map raised nothing), or for
    combine a bare TypeError naming neither combine nor its key, raised in remap's loop."""
    ctx = _context(tmp_path, on_error="continue", **fns)
    with pytest.raises((JobCodeError, BadOutput)) as caught:
        map_task(ctx, _split(tmp_path, "a\n"))
    assert message in str(caught.value)


def _raising_combine(key, values):
    raise ValueError(f"cannot fold {key}")
    yield  # pragma: no cover


@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_a_raising_combine_is_named_and_fails_the_task(tmp_path: Path, on_error: str) -> None:
    """A combine that raises fails the map task, even on continue (it folds many records'
    values), with a line naming combine and the key and the user's exception as the cause.
    Before: "map task 0: ValueError: cannot fold a", naming neither combine nor the key."""
    ctx = _context(tmp_path, combine=_raising_combine, on_error=on_error)
    with pytest.raises(CombineError, match=r"combine\('a', values\) raised ValueError: cannot"):
        map_task(ctx, _split(tmp_path, "a\n"))


def _raising_read(path: str):
    yield "first"
    raise OSError("disk gone")


@pytest.mark.parametrize(
    ("fns", "message"),
    [
        ({"partition": lambda key, n: 1 / 0}, "partition('a', 2) raised ZeroDivisionError"),
        ({"group": lambda key: key[5]}, "group('a') raised IndexError: string index out of"),
        ({"read": _raising_read}, "read('"),
    ],
)
def test_a_raising_partition_group_or_read_is_named(
    tmp_path: Path, fns: dict, message: str
) -> None:
    """partition, group or read raising fails the map task (even on continue: no one record's
    error) with a line naming the function and its argument, the user's exception as the
    cause. Before: the bare "ZeroDivisionError: division by zero" (or IndexError, OSError)."""
    ctx = _context(tmp_path, on_error="continue", **fns)
    with pytest.raises(HookError) as caught:
        map_task(ctx, _split(tmp_path, "a\n"))
    assert message in str(caught.value)
    assert isinstance(caught.value.__cause__, (ZeroDivisionError, IndexError, OSError))
    if "read" in fns:
        assert str(caught.value).endswith("in0.txt') raised OSError: disk gone")


@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_a_reduce_that_returns_none_is_named(tmp_path: Path, on_error: str) -> None:
    """A reduce that prints instead of yielding (returns None) fails, even on continue, with a
    line saying so. Before: "reduce raised TypeError: 'NoneType' object is not iterable",
    with a traceback into remap's own loop."""

    def printing_reduce(key, values):
        print(key, sum(values))

    ctx = _context(tmp_path, {"default": 1}, reduce=printing_reduce, on_error=on_error)
    runs = [r[2] for r in map_task(ctx, _split(tmp_path, "w"))["runs"]]
    with pytest.raises(JobCodeError, match=r"key 'w': reduce returned None: it must yield"):
        reduce_task(ctx, (0, "default", 0, runs))


def test_a_full_disk_under_the_reduce_fails_the_task_even_on_continue(tmp_path: Path) -> None:
    """A write of the output file that finds the disk full (the buffered file flushing an
    earlier key's records, as the default writer's does) is no record's error: the task fails
    with one line naming the file, nothing committed. Counted per key on ``continue``, the
    records of every buffer that failed were lost and the job could end OK (exit 5)."""
    written = []

    def writer(record, file):
        if len(written) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(record)
        file.write(f"{record[0]}\t{record[1]}\n")

    ctx = _context(tmp_path, {"default": 1}, write=writer, on_error="continue")
    runs = [r[2] for r in map_task(ctx, _split(tmp_path, "a b c d e"))["runs"]]
    with pytest.raises(StorageError, match=r"cannot write .*reducer-0000-part-00000: disk full"):
        reduce_task(ctx, (0, "default", 0, runs))
    assert [p.name for p in (tmp_path / "staging" / "default").iterdir()] == []


def test_a_full_disk_under_a_spill_names_the_directory(tmp_path: Path, monkeypatch) -> None:
    """A map task's spill that finds the disk full fails the task saying so, and leaves no
    partial run (was: "OSError: [Errno 28] No space left on device", no path)."""
    real = tasks.write_run

    def write_run(path, records):
        real(path, records)  # the file is there, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tasks, "write_run", write_run)
    ctx = _context(tmp_path, {"default": 1})
    with pytest.raises(StorageError, match=r"cannot write .*reducer-0000: disk full"):
        map_task(ctx, _split(tmp_path, "a b"))
    progress = ctx.data.progress_dir(ctx.job_id)
    assert [p for p in layout.walk_files(tmp_path / "data" / "im") if p.parent != progress] == []


def test_reduce_errors_name_the_key(tmp_path: Path) -> None:
    """A reduce that raises names its reducer and key."""

    def bad_reduce(key, values):
        raise KeyError(key)
        yield  # pragma: no cover

    ctx = _context(tmp_path, {"default": 1}, reduce=bad_reduce)
    runs = [r[2] for r in map_task(ctx, _split(tmp_path, "w"))["runs"]]
    with pytest.raises(
        RecordError, match="reducer-0000 .default reducer 0. key 'w': reduce raised KeyError"
    ):
        reduce_task(ctx, (0, "default", 0, runs))


def test_hooks_run_around_the_task(tmp_path: Path) -> None:
    """map_init/map_final (in-mapper combining) and reduce_final's extra records."""
    state: dict[str, int] = {}

    def map_init():
        state.clear()

    def counting_map(line):
        for word in line.split():
            state[word] = state.get(word, 0) + 1

    def reduce_final():
        return ["# end"]

    ctx = _context(
        tmp_path,
        {"default": 1},
        map=counting_map,
        map_init=map_init,
        map_final=lambda: state.items(),
        reduce_final=reduce_final,
    )
    results = [map_task(ctx, _split(tmp_path, "a a b", 0)), map_task(ctx, _split(tmp_path, "a", 1))]
    assert _reduce_all(ctx, results) == ["# end", "a\t3", "b\t1"]
    assert results[0]["counters"]["map_records_out"] == 2  # one pair per word, not per use


def test_init_hooks_results_are_ignored(tmp_path: Path) -> None:
    """What map_init and reduce_init return (a number, a state object) is not output."""
    ctx = _context(
        tmp_path, {"default": 1}, map=_wc_map, map_init=lambda: 3, reduce_init=lambda: object()
    )
    results = [map_task(ctx, _split(tmp_path, "a a b", 0))]
    assert _reduce_all(ctx, results) == ["a\t2", "b\t1"]


def test_functions_from_checks_the_module() -> None:
    """map is required, reduce per purpose (reduce_<purpose> wins), non-callables refused."""
    from remap.errors import ConfigError

    with pytest.raises(ConfigError, match="no 'map' function"):
        functions_from({"reduce": _sum}, ["default"])
    with pytest.raises(ConfigError, match="nor 'reduce_lengths'"):
        functions_from({"map": _wc_map}, ["lengths"])
    with pytest.raises(ConfigError, match="'combine' must be a function"):
        functions_from({"map": _wc_map, "reduce": _sum, "combine": 3}, ["default"])
    fns = functions_from({"map": _wc_map, "reduce": _sum, "reduce_b": _wc_map}, ["default", "b"])
    assert fns.reduce == {"default": _sum, "b": _wc_map}


def test_a_misspelt_map_or_reduce_is_named() -> None:
    """A module whose ``map`` or ``reduce`` is misspelt is told the name it did define, as a
    job file's misspelt key or function is; a hook or combine is never offered for them."""
    from remap.errors import ConfigError
    from remap.vertex.program import program_from_namespace

    with pytest.raises(ConfigError, match=r"no 'map' function \(did you mean 'mapp'\?\) \("):
        functions_from({"mapp": _wc_map, "map_init": _sum, "reduce": _sum}, ["default"])
    with pytest.raises(ConfigError, match=r"no 'reduce' function \(did you mean 'reduec'\?\)$"):
        functions_from({"map": _wc_map, "reduec": _sum, "reduce_init": _sum}, ["default"])
    with pytest.raises(ConfigError, match=r"no 'map' function \(map\(record\)"):
        functions_from({"map_init": _sum, "map_final": _sum, "reduce": _sum}, ["default"])
    with pytest.raises(ConfigError, match=r"must define compute\(\) \(did you mean 'compuet'\?\)$"):
        program_from_namespace({"prepare": _sum, "compuet": _sum, "combine": _sum}, "job.py")


# ------------------------------------------------------------------ map_batch


def _words_corpus(tmp_path: Path, seed: int) -> list[Path]:
    """Three files of random words (one empty, one without a final newline, CRLF lines)."""
    rng = random.Random(seed)
    words = ["a", "bb", "Ccc", "d'd", "é", "x,y", "tab\there"]
    files = []
    for i, (lines, ending) in enumerate([(400, "\n"), (0, "\n"), (250, "\r\n")]):
        text = ending.join(
            " ".join(rng.choice(words) for _ in range(rng.randrange(0, 12))) for _ in range(lines)
        )
        path = tmp_path / f"words{i}.txt"
        path.write_text(text + ("" if i == 2 else ending) if text else "", newline="")
        files.append(path)
    return files


def _serial_counts(files: list[Path]) -> Counter:
    counts: Counter = Counter()
    for path in files:
        for line in path.read_text().splitlines():
            counts.update(line.lower().split())
    return counts


def _batch_pairs(lines):  # a generator over the whole batch: spills may happen inside it
    for word in " ".join(lines).lower().split():
        yield word, 1


def _batch_counter(lines):  # a dict per batch, folded by the combiner
    return Counter(" ".join(lines).lower().split())


_STATE: Counter = Counter()


def _batch_into_state(lines):  # in-mapper combining: nothing per batch, all at map_final
    _STATE.update(" ".join(lines).lower().split())


def _combine_sum(key, values):
    yield sum(values)


def _reduce_sum(key, values):
    yield key, sum(values)


_BATCH_JOBS = {
    "pairs": {"map_batch": _batch_pairs},
    "pairs+combine": {"map_batch": _batch_pairs, "combine": _combine_sum},
    "counter+combine": {"map_batch": _batch_counter, "combine": _combine_sum},
    "in-mapper": {
        "map_batch": _batch_into_state,
        "map_init": _STATE.clear,
        "map_final": lambda: _STATE,
    },
}


@pytest.mark.parametrize("job", sorted(_BATCH_JOBS))
@pytest.mark.parametrize(
    ("reducers", "split_bytes", "spill_bytes", "batch_bytes"),
    [(1, 1 << 20, 1 << 20, 1 << 14), (3, 700, 300, 64), (2, 3000, 5000, 1000)],
)
def test_map_batch_equals_the_serial_count(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job: str,
    reducers: int,
    split_bytes: int,
    spill_bytes: int,
    batch_bytes: int,
) -> None:
    """map_batch (pairs, a dict per batch, in-mapper combining) gives the serial counts
    whatever the reducers, split, spill and batch sizes; every line is in exactly one batch."""
    monkeypatch.setattr(tasks, "BATCH_BYTES", batch_bytes)
    files = _words_corpus(tmp_path, seed=reducers)
    namespace = {"map": None, "reduce": _reduce_sum, **_BATCH_JOBS[job]}
    ctx = dataclasses.replace(
        _context(tmp_path, {"default": reducers}, **namespace), spill_bytes=spill_bytes
    )
    splits = inputs.make_splits(files, split_bytes, splittable=True)
    results = [map_task(ctx, (s.index, s.path, s.start, s.end)) for s in splits]
    got = Counter()
    for line in _reduce_all(ctx, results):
        word, n = line.rsplit("\t", 1)
        got[word] += int(n)
    assert got == _serial_counts(files)
    lines = sum(len(p.read_text().splitlines()) for p in files)
    assert sum(r["counters"]["map_records_in"] for r in results) == lines
    if spill_bytes < 1000 and job == "pairs":
        assert sum(r["counters"]["map_spills"] for r in results) > len(splits)


def test_map_batch_gets_lists_of_lines_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call gets a list of whole lines (no line endings); together they are the split's
    lines in order, cut into blocks of about BATCH_BYTES."""
    monkeypatch.setattr(tasks, "BATCH_BYTES", 50)
    seen: list[list[str]] = []

    def record(lines):
        assert type(lines) is list
        seen.append(list(lines))

    text = "".join(f"line {i}\r\n" if i % 3 else f"line {i}\n" for i in range(40))
    ctx = _context(tmp_path, map=None, map_batch=record)
    map_task(ctx, _split(tmp_path, text))
    assert len(seen) > 5
    assert [line for batch in seen for line in batch] == [f"line {i}" for i in range(40)]


def _bad_batch(lines):
    if "bad" in lines:
        raise ValueError("no good")
    count("good_batches")
    return {line: 1 for line in lines}


def test_map_batch_errors_name_the_block_or_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raising map_batch names the file, the block's first line and its size; on continue
    the block is counted as one error and the other blocks' output is kept."""
    monkeypatch.setattr(tasks, "BATCH_BYTES", 8)  # about two lines a block
    split = _split(tmp_path, "ok1\nok2\nbad\nok3\nok4\nok5\n")
    with pytest.raises(
        RecordError, match=r"in0\.txt:3 \(a batch of 2 records\): map_batch raised ValueError"
    ):
        map_task(_context(tmp_path, map=None, map_batch=_bad_batch), split)
    ctx = _context(tmp_path, {"default": 1}, map=None, map_batch=_bad_batch, on_error="continue")
    result = map_task(ctx, split)
    assert result["counters"]["map_errors"] == 1
    assert result["counters"]["good_batches"] == 2
    assert result["errors"] == [f"{split[1]}:3 (a batch of 2 records): ValueError: no good"]
    assert _reduce_all(ctx, [result]) == ["ok1\t1", "ok2\t1", "ok4\t1", "ok5\t1"]


def test_map_may_return_a_dict(tmp_path: Path) -> None:
    """map (per record) and map_final may return a dict of key -> value (a Counter, say)."""
    ctx = _context(
        tmp_path,
        {"default": 1},
        map=lambda line: Counter(line.split()),
        combine=_combine_sum,
        map_final=lambda: {"end": 1},
    )
    result = map_task(ctx, _split(tmp_path, "a b a\nb\n"))
    assert _reduce_all(ctx, [result]) == ["a\t2", "b\t2", "end\t1"]


def test_map_and_map_batch_are_one_or_the_other() -> None:
    """A module needs map or map_batch, not both."""
    from remap.errors import ConfigError

    with pytest.raises(ConfigError, match="no 'map' function .*map_batch"):
        functions_from({"reduce": _sum}, ["default"])
    with pytest.raises(ConfigError, match="both 'map' and 'map_batch'"):
        functions_from({"map": _wc_map, "map_batch": _batch_pairs, "reduce": _sum}, ["default"])
    assert functions_from({"map_batch": _batch_pairs, "reduce": _sum}, ["default"]).map is None


def test_map_batch_with_a_custom_reader(tmp_path: Path) -> None:
    """With read(path), map_batch gets the reader's records in lists of 4,096, in order; an
    error names the batch's first record."""
    seen: list[int] = []

    def numbers(path):
        yield from range(10_000)

    def batch(records):
        seen.extend(records)
        if 9_999 in records:
            raise ValueError("last batch")
        return {"n": len(records)}

    ctx = _context(
        tmp_path,
        {"default": 1},
        map=None,
        map_batch=batch,
        read=numbers,
        combine=_combine_sum,
        on_error="continue",
    )
    result = map_task(ctx, _split(tmp_path, "unused"))
    assert seen == list(range(10_000))
    assert result["counters"]["map_records_in"] == 10_000
    assert result["errors"] == [
        f"{tmp_path / 'in0.txt'}: record 8193 (a batch of 1808 records): ValueError: last batch"
    ]
    assert _reduce_all(ctx, [result]) == ["n\t8192"]


@pytest.mark.parametrize("cleanup", ["driver's end", "server after a dead driver"])
def test_a_kill_racing_a_running_tasks_progress_write_leaves_no_scratch(
    tmp_path: Path, monkeypatch, cleanup: str
) -> None:
    """A kill's cleanup removes ``im/<job>`` while a map task still runs and writes its
    progress: the driver's own end, or the server's (``abandon``) after a detached driver died.
    Here the write comes when the removal has emptied ``progress/`` and is about to remove it.
    Nothing of the job's scratch is left and the late write fails (the scratch was renamed away
    before it was removed). Before, the write landed in ``progress/``, which kept
    ``im/<job>/progress/<task>.<attempt>.json`` and ``im/<job>`` until the next job's sweep."""
    from remap.data.driver import DataJobRunner, job_from_functions
    from remap.server.drivers import abandon

    ctx = _context(tmp_path)
    data = ctx.data
    data.progress_dir(JOB).mkdir()
    progress = tasks._Progress(ctx, "mapper", 0)
    progress.update(force=True, records_in=0)  # the task runs
    raced: list[str] = []
    real_rmdir = os.rmdir

    def rmdir(path, *args, **kw):
        if os.path.basename(os.fspath(path)) == "progress" and not raced:
            try:
                progress.update(force=True, records_in=1)
                raced.append("written")
            except FileNotFoundError:
                raced.append("refused")
        return real_rmdir(path, *args, **kw)

    monkeypatch.setattr(os, "rmdir", rmdir)
    if cleanup == "driver's end":
        job = job_from_functions({"map": _wc_map, "reduce": _sum}, [], tmp_path / "out")
        DataJobRunner(None, job, data, job_id=JOB)._finish("INCOMPLETE")  # type: ignore[arg-type]
    else:
        config = {"kind": "mapreduce", "output": str(tmp_path / "out")}
        layout.write_json(data.jobconfig(JOB), config)
        abandon(data, "mapreduce", JOB, "the driver died")
    assert [p.relative_to(data.root) for p in (data.root / "im").rglob("*")] == []
    assert raced == ["refused"]
    assert layout.read_result(data, JOB) == "INCOMPLETE"


def test_a_jobs_scratch_a_removal_left_part_of_goes_with_the_next_jobs_sweep(
    tmp_path: Path,
) -> None:
    """What a removal of a job's scratch could not remove (on NFS, a file a late task still
    held open kept its folder) is in ``im/<job>.gone``, which no job reads: the next job's
    sweep removes it (it matched no job's lock, and stayed for good)."""
    data = DataDir(tmp_path / "data")
    left = data.root / "im" / f"{JOB}{layout.GONE}" / "progress"
    left.mkdir(parents=True)
    (left / ".nfs0000000000001234").write_bytes(b"x")
    layout.remove_orphan_scratch(data)
    assert list((data.root / "im").iterdir()) == []
