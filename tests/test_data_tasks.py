"""The map and reduce tasks in-process (no cluster): attempt naming, what reducers read,
user-code errors, hooks, and the data-directory check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from remap.data import count, layout
from remap.data.layout import DataDir
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
