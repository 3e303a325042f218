"""One rule for inputs, data and vertex jobs alike, through the console and the Python API.

An input that names nothing that exists (a missing path, a glob matching nothing) is a
one-line error naming the ``input`` key (its file and line for a job file); an existing
directory with no files is an empty, successful job: empty output, ``_SUCCESS``, result OK.
(A vertex job over an empty directory used to fail while a data job over it succeeded.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import remap
from remap.data.jobspec import to_job
from remap.errors import ConfigError
from remap.jobfile import load_job_text
from remap.settings import Settings
from remap.vertex.jobspec import to_run
from tests.cluster_harness import ROOT, NodeSpec
from tests.test_console_cli import console

SOURCE = "jobs/j.yaml"
MODULES = {
    "mapreduce": ROOT / "examples" / "mapreduce" / "wordcount.py",
    "vertex": ROOT / "examples" / "vertex" / "pagerank.py",
}
KINDS = sorted(MODULES)
#: (input entry, what the one line says about it)
NOTHING = [
    ("missing/", "input 'missing/': no such file or directory"),
    ("'empty/*.txt'", "input 'empty/*.txt': no file matches"),
]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A job directory: both kinds' modules, an empty input directory (a hidden file in it)."""
    for kind, module in MODULES.items():
        shutil.copy(module, tmp_path / f"{kind}.py")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("not an input\n")
    return tmp_path


def job_text(kind: str, entry: str, output: str = "out/") -> str:
    return f"kind: {kind}\nmodule: {kind}.py\ninput: {entry}\noutput: {output}\n"


def prepare(kind: str, text: str, base: Path) -> Any:
    """What ``compute`` does with a job file before any cluster starts."""
    spec = load_job_text(text, base, source=SOURCE)
    return to_job(spec) if kind == "mapreduce" else to_run(spec)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("entry", "says"), NOTHING, ids=["missing", "glob"])
def test_an_input_naming_nothing_is_one_line_naming_the_key(
    base: Path, kind: str, entry: str, says: str
) -> None:
    """A missing path or a glob matching nothing: one ConfigError line at the input key."""
    with pytest.raises(ConfigError) as info:
        prepare(kind, job_text(kind, entry), base)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}:3: key 'input': {says}"), message
    assert "\n" not in message


@pytest.mark.parametrize("kind", KINDS)
def test_an_existing_empty_directory_is_no_error(base: Path, kind: str) -> None:
    """An existing directory with no (visible) files passes the checks, for either kind."""
    prepare(kind, job_text(kind, "empty/"), base)


@pytest.mark.parametrize("kind", KINDS)
def test_globs_and_paths_under_a_directory_named_like_a_glob(tmp_path: Path, kind: str) -> None:
    """Only the entry is a pattern: under a directory named ``run[1]`` (as pytest names a
    parametrized test's), a glob entry and the directory's own absolute path both find the
    file, and a glob that matches nothing is still the one-line error."""
    from remap.data.inputs import resolve_inputs as data_inputs
    from remap.vertex.jobspec import resolve_inputs as vertex_inputs

    base = tmp_path / "run[1]"
    (base / "in").mkdir(parents=True)
    (base / "in" / "a.txt").write_text("1 2\n")
    if kind == "mapreduce":
        found = [data_inputs([entry], base) for entry in ("in/*.txt", str(base / "in"))]
        assert found == [[base / "in" / "a.txt"]] * 2
        with pytest.raises(ConfigError, match="no file matches"):
            data_inputs(["in/*.csv"], base)
    else:
        assert vertex_inputs(("in/*.txt",), base) == [base / "in" / "a.txt"]
        assert vertex_inputs((str(base / "in"),), Path.cwd()) == [base / "in"]
        with pytest.raises(ConfigError, match="no file matches"):
            vertex_inputs(("in/*.csv",), base)


def assert_empty_output(output: Path) -> None:
    assert (output / "_SUCCESS").exists()
    parts = [p for p in output.rglob("*") if p.is_file() and p.name != "_SUCCESS"]
    assert all(p.stat().st_size == 0 for p in parts), parts


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compute_over_an_empty_directory_is_an_empty_successful_job(base: Path, kind: str) -> None:
    """``compute job.yaml`` over an existing empty directory: exit 0, an empty output with
    _SUCCESS, result OK; the same file over a missing path: exit 2 and one line naming the key."""
    job = base / "job.yaml"
    job.write_text(job_text(kind, "empty/"))
    done = console(base, "compute", job, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (Path(summary["job_dir"]) / "result").read_text().strip() == "OK"
    assert_empty_output(base / "out")

    job.write_text(job_text(kind, "missing/", output="out2/"))
    refused = console(base, "compute", job)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        f"error: {job}:3: key 'input': input 'missing/': no such file or directory "
        f"({base / 'missing'})"
    )
    assert not (base / "out2").exists()


def words(line: str) -> Any:
    for word in line.split():
        yield word, 1


def total(word: str, counts: Any) -> Any:
    yield word, sum(counts)


def vertex_of(line: str) -> Any:
    return (line.strip(), 0, [])


def halt(ctx: Any, vertex_id: str, value: int, messages: list) -> tuple[int, bool]:
    return value, True


#: each kind's functions for the Python API
FUNCTIONS = {
    "mapreduce": {"map": words, "reduce": total},
    "vertex": {"prepare": vertex_of, "compute": halt},
}


def run_api(cluster: remap.Cluster, kind: str, entry: Path | str, output: Path) -> Any:
    if kind == "mapreduce":
        return cluster.mapreduce(FUNCTIONS[kind], entry, output)
    return cluster.vertex(FUNCTIONS[kind], entry, output)


@pytest.mark.slow
def test_the_api_follows_the_same_rule_for_both_kinds(base: Path, monkeypatch) -> None:
    """``cluster.mapreduce`` and ``cluster.vertex`` over an existing empty directory: an empty,
    successful job; over a missing path or a glob matching nothing (relative to the caller's
    directory): ConfigError, one line naming ``input`` and the entry, and no output."""
    monkeypatch.chdir(base)
    with remap.connect(cores=2, settings=Settings()) as cluster:
        for kind in KINDS:
            result = run_api(cluster, kind, base / "empty", base / f"{kind}-out")
            state = result["state"] if kind == "mapreduce" else result.state
            assert state == ("OK" if kind == "mapreduce" else "done"), result
            job_dir = result["job_dir"] if kind == "mapreduce" else result.job_dir
            assert (Path(job_dir) / "result").read_text().strip() == "OK"
            assert_empty_output(base / f"{kind}-out")
            for entry, says in [("missing/", NOTHING[0][1]), ("empty/*.txt", NOTHING[1][1])]:
                with pytest.raises(ConfigError) as info:
                    run_api(cluster, kind, entry, base / f"{kind}-nothing")
                assert str(info.value).startswith(says), (kind, str(info.value))
                assert "\n" not in str(info.value)
                assert not (base / f"{kind}-nothing").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_detached_job_over_an_empty_directory_ends_ok(
    make_cluster: Any, base: Path, kind: str
) -> None:
    """``compute --detach`` (the server runs the job's driver): over an existing empty
    directory the job ends done, ``attach`` gets a successful summary, the output is empty."""
    c = make_cluster([NodeSpec(cores=2)], env={"REMAP_DATA_DIR": str(base / "data")})
    (base / "job.yaml").write_text(job_text(kind, "empty/"))
    started = c.assert_ok(c.console("compute", "job.yaml", "--detach", "--json", cwd=base))
    job_id = json.loads(started.stdout)["job"]
    done = c.assert_ok(c.console("attach", str(job_id), "--json", timeout=120))
    assert json.loads(done.stdout)["state"] in ("OK", "done"), done.stdout
    assert_empty_output(base / "out")
