"""``kind: vertex`` job files (strict keys, file:line:key errors) and ``compute`` on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from remap.errors import ConfigError
from remap.jobfile import load_job_text
from remap.vertex.jobspec import VertexSpec, to_run
from tests.test_console_cli import console
from tests.test_jobfile import assert_bad_job
from tests.vertex_graphs import EXAMPLES, parse_output

SOURCE = "jobs/pr.yaml"
V = "kind: vertex\nmodule: pr.py\ninput: in/\noutput: out/\n"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLES / "pagerank.py", tmp_path / "pr.py")
    (tmp_path / "nocompute.py").write_text("def prepare(line):\n    return None\n")
    (tmp_path / "badfold.py").write_text(
        "def prepare(l):\n    return None\n\ndef compute(*a):\n    pass\n\naggregators = {'x': 'avg'}\n"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("1 2\n2 1\n")
    return tmp_path


def test_full_vertex_job_file(base: Path) -> None:
    """Every key, resolved: paths relative to the job file, partitions, supersteps, checkpoints."""
    text = (
        V
        + "partitions: 7\nmax_supersteps: 50\ncheckpoint_every: 5\non_error: continue\nname: pr\nretries: 1\n"
    )
    spec = load_job_text(text, base, source=SOURCE)
    assert isinstance(spec, VertexSpec) and spec.kind == "vertex"
    assert (spec.partitions, spec.max_supersteps, spec.checkpoint_every) == (7, 50, 5)
    assert spec.output == base / "out" and spec.on_error == "continue" and spec.retries == 1
    program, config = to_run(spec)
    assert config.input == [base / "in" / "a.txt"] and config.partitions == 7
    assert program.aggregators.keys() == {"dangling", "change"}
    auto = load_job_text(V + "partitions: auto\n", base, source=SOURCE)
    assert auto.partitions is None and auto.max_supersteps == 30 and auto.checkpoint_every == 0


ERROR_CASES = [
    pytest.param("kind: vertex  #!\nmodule: pr.py\noutput: out/\n", ["key 'input' is required"], id="no-input"),
    pytest.param("kind: vertex  #!\ninput: in/\noutput: out/\n", ["key 'module' is required"], id="no-module"),
    pytest.param(V + "partitions: 0  #!\n", ["key 'partitions'", "integer >= 1 or auto"], id="zero-partitions"),
    pytest.param(V + "partitions: many  #!\n", ["key 'partitions'"], id="text-partitions"),
    pytest.param(V + "max_supersteps: -1  #!\n", ["key 'max_supersteps'"], id="negative-supersteps"),
    pytest.param(V + "checkpoint_every: 1.5  #!\n", ["key 'checkpoint_every'"], id="float-checkpoint"),
    pytest.param(V + "timeout: 5  #!\n", ["key 'timeout'", "not used by 'kind: vertex' jobs"], id="timeout"),
    pytest.param(V + "reducers: 2  #!\n", ["key 'reducers'", "not used by 'kind: vertex'"], id="data-key"),
    pytest.param(V + "max_superstep: 5  #!\n", ["unknown key", "did you mean 'max_supersteps'"], id="typo"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_bad_vertex_job_names_line_and_key(base: Path, text: str, expected: list[str]) -> None:
    """Each mistake is one ConfigError line starting ``source:line:``."""
    assert_bad_job(text, base, SOURCE, expected)


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("module", "module: nocompute.py", "must define compute()"),
        ("module", "module: badfold.py", "unknown fold 'avg'"),
        ("module", "module: missing.py", "file not found"),
        ("input", "input: 'nothing/*.txt'", "input 'nothing/*.txt': no file matches"),
        ("input", "input: nothing/", "input 'nothing/': no such file or directory"),
    ],
)
def test_resolution_problems_name_their_key(base: Path, key: str, text: str, expected: str) -> None:
    """A module without compute, a bad aggregator, a missing input or an empty glob: an
    error at its key's line (an existing empty directory is not one: tests/test_empty_inputs.py)."""
    lines = {"module": "module: pr.py", "input": "input: in/"}
    lines[key] = text
    job = f"kind: vertex\n{lines['module']}\n{lines['input']}\noutput: out/\n"
    spec = load_job_text(job, base, source=SOURCE)
    with pytest.raises(ConfigError) as info:
        to_run(spec)
    line = 2 if key == "module" else 3
    assert str(info.value).startswith(f"{SOURCE}:{line}: key '{key}': "), str(info.value)
    assert expected in str(info.value)


def test_existing_output_is_refused_before_anything_runs(base: Path) -> None:
    """The output must not exist: refused naming the key, before a cluster is started."""
    (base / "out").mkdir()
    spec = load_job_text(V, base, source=SOURCE)
    with pytest.raises(ConfigError, match=r"key 'output': .* already exists"):
        to_run(spec)
    (base / "out").rmdir()
    (base / "out").symlink_to(base / "gone")  # a dangling link is taken too
    with pytest.raises(ConfigError, match=r"key 'output': .* already exists: a vertex job"):
        to_run(spec)


@pytest.mark.slow
def test_compute_runs_a_vertex_job_file_with_json_summary(tmp_path: Path) -> None:
    """``compute sssp.yaml --json`` on an embedded cluster: exit 0, one JSON summary, the
    output directory with _SUCCESS and the job directory's result; a second run is refused."""
    shutil.copytree(EXAMPLES, tmp_path / "ex", ignore=shutil.ignore_patterns("out"))
    job = tmp_path / "ex" / "sssp.yaml"
    done = console(tmp_path, "compute", job, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["state"] == "done" and summary["supersteps"] > 3 and summary["rollbacks"] == 0
    out = tmp_path / "ex" / "out" / "sssp"
    assert (out / "_SUCCESS").exists()
    got = parse_output(sum((p.read_text().splitlines() for p in out.glob("part-*")), []))
    assert got[0] == "0" and len(got) == summary["vertices"]
    assert (Path(summary["job_dir"]) / "result").read_text().strip() == "OK"
    again = console(tmp_path, "compute", job)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_progress_line_shows_active_messages_and_aggregates() -> None:
    """One line per barrier: superstep, active vertices, messages delivered, each aggregate."""
    from remap.console.filejob import report_line
    from remap.vertex.driver import SuperstepReport

    report = SuperstepReport(3, 120, 900, 450, 500, {"dangling": 0.0123456789, "seen": {1}}, 2)
    assert report_line(report) == (
        "superstep 3: 120 active, 450 messages, dangling=0.0123457, seen={1}, 2 errors"
    )


def test_vertex_errors_under_continue_exit_5() -> None:
    """Vertices that raised under on_error: continue exit 5 (as failed arguments do), also
    through ``attach``; none: 0."""
    from remap.console.filejob import print_summary
    from tests.test_data_jobfile import _Lines

    result = {
        "state": "done", "supersteps": 3, "vertices": 6, "messages": 9, "bytes_moved": 95,
        "workers": 2, "output": "/o", "elapsed": 0.2, "rollbacks": 0, "errors": 1,
        "first_error": "vertex 3 in superstep 1: ValueError", "job_dir": "/d",
    }  # fmt: skip
    console = _Lines()
    assert print_summary(console, "vertex", result, False) == 5
    assert "(exit code 5)" in console.err[-1]
    assert print_summary(_Lines(), "vertex", result, True) == 5
    result["errors"] = 0
    assert print_summary(_Lines(), "vertex", result, True) == 0


@pytest.mark.parametrize("functions", ["pagerank.py", None, 3])
def test_functions_that_are_not_a_namespace_are_one_clear_error(functions: object) -> None:
    """``cluster.vertex("pagerank.py", ...)`` is a TypeError saying what to give, as for
    ``cluster.mapreduce``; it was an AttributeError from deep inside ('str' has no 'get')."""
    from remap.vertex.program import program_from_namespace

    with pytest.raises(TypeError, match="a module or a dict of role -> function"):
        program_from_namespace(functions, "vertex job")  # type: ignore[arg-type]
