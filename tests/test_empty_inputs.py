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
from remap.data.inputs import absolute_entry, resolve_inputs
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


#: (input entry, what the one line says) with a FIFO and a broken link in ``odd/``
NOT_FILES = [
    ("odd/", "odd/pipe is a FIFO, not a regular file"),
    ("odd/pipe", "odd/pipe is a FIFO, not a regular file"),
    ("'odd/p*'", "odd/pipe is a FIFO, not a regular file"),
    ("odd/gone", "odd/gone is a broken symbolic link (to nowhere.txt)"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("entry", "says"), NOT_FILES, ids=["walk", "named", "glob", "link"])
def test_an_input_that_is_no_regular_file_is_one_line(
    base: Path, kind: str, entry: str, says: str
) -> None:
    """A FIFO (walked, named or globbed) or a broken symbolic link among the inputs: one line
    naming it, before anything runs. A FIFO named was 'no such file or directory', walked or
    globbed an empty file (a task reading it would block); a broken link a traceback."""
    import os

    (base / "odd").mkdir()
    os.mkfifo(base / "odd" / "pipe")
    (base / "odd" / "gone").symlink_to("nowhere.txt")
    if entry == "odd/":  # walked, the FIFO alone
        os.unlink(base / "odd" / "gone")
    with pytest.raises(ConfigError) as info:
        prepare(kind, job_text(kind, entry), base)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}:3: key 'input': input {entry.strip(chr(39))!r}: ")
    assert message.endswith(says) and "\n" not in message, message


@pytest.mark.parametrize("kind", KINDS)
def test_an_existing_empty_directory_is_no_error(base: Path, kind: str) -> None:
    """An existing directory with no (visible) files passes the checks, for either kind."""
    prepare(kind, job_text(kind, "empty/"), base)


#: the tree every row of :data:`RULE` resolves in (under a base directory named ``run[1]``)
TREE = [
    "in/a.txt",
    "in/sub/b.txt",
    "in/_SUCCESS",  # a job's marker, its logs and checksums: skipped by a walk or a wildcard
    "in/_logs/part.txt",
    "in/.hidden",
    "in/.cache/c.txt",
    "in/z/_x",
    "d[1]/e.txt",
    "empty/.hidden",
]
A, B, X = "in/a.txt", "in/sub/b.txt", "in/z/_x"
#: (entries, the files they give in order, or the start of the one error line)
RULE = [
    (["in/a.txt"], [A]),
    (["in"], [A, B]),  # a directory: its files recursively, sorted; hidden names skipped
    (["in/"], [A, B]),
    (["in/z/_x"], [X]),  # a file named explicitly is read whatever its name
    (["in/_SUCCESS", "in/.hidden"], ["in/_SUCCESS", "in/.hidden"]),
    (["in/*"], [A, B]),  # a glob: matching directories are walked, hidden matches skipped
    (["in/**/*.txt"], [A, B]),  # not in/_logs/part.txt nor in/.cache/c.txt
    (["in/_*"], ["in/_SUCCESS", "in/_logs/part.txt"]),  # a pattern that types the _ asks
    (["in/_logs"], ["in/_logs/part.txt"]),  # a hidden directory named explicitly is walked
    (["in/sub/b.txt", "in", "in/*.txt", "in/./a.txt"], [B, A]),  # once each, first place kept
    (["d[1]"], ["d[1]/e.txt"]),  # a name with [ is itself before it is a glob
    (["d[[]1]/*.txt", "*/e.txt"], ["d[1]/e.txt"]),
    (["empty"], []),  # an existing directory with no (shown) files: an empty job
    (["missing/"], "input 'missing/': no such file or directory"),
    (["in", "in/*.csv"], "input 'in/*.csv': no file matches"),
    (["in/*SUCCESS"], "input 'in/*SUCCESS': no file matches"),  # only hidden names matched
    ([], "no input given"),
]


@pytest.mark.parametrize(("entries", "gives"), RULE, ids=[repr(e) for e, _ in RULE])
def test_the_input_rule(tmp_path: Path, entries: list[str], gives: list[str] | str) -> None:
    """The one resolver data and vertex jobs share, under a base directory whose own name
    holds ``[`` (only the entry is a pattern); the entries made absolute (as a detached job
    ships them) give the same files from another directory."""
    base = tmp_path / "run[1]"
    for name in TREE:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(name + "\n")
    if isinstance(gives, str):
        with pytest.raises(ConfigError) as info:
            resolve_inputs(entries, base)
        assert str(info.value).startswith(gives), str(info.value)
        return
    want = [(base / name).resolve() for name in gives]
    assert resolve_inputs(entries, base) == want
    # as a detached job ships them: absolute, resolved on the server in another directory
    assert resolve_inputs([absolute_entry(e, base) for e in entries], tmp_path) == want


def data_output(root: Path) -> Path:
    """A directory as a data job leaves it: a purpose directory of reducer files and
    ``_SUCCESS`` (here with text in it, as some committers write)."""
    (root / "default").mkdir(parents=True)
    for reducer, words in enumerate(["a\t1\nb\t2\n", "c\t3\n"]):
        (root / "default" / f"reducer-{reducer:04d}-part-00000").write_text(words)
    (root / "_SUCCESS").write_text('{"committer": "not an input"}\n')
    return root


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ["prev/", "prev/*"])
def test_a_data_jobs_output_is_input_as_it_is(base: Path, kind: str, entry: str) -> None:
    """Before a cluster starts, a job file over a previous data job's output (the directory
    or a glob of it) resolves to its reducer files, never its ``_SUCCESS``."""
    parts = sorted((data_output(base / "prev") / "default").iterdir())
    job = prepare(kind, job_text(kind, f"'{entry}'"), base)
    if kind == "vertex":
        assert job[1].input == parts
    else:
        assert resolve_inputs(job.inputs, job.base_dir) == parts


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


def line_once(line: str) -> Any:
    yield line, 1


@pytest.mark.slow
def test_jobs_read_a_previous_data_jobs_output_without_its_marker(base: Path, monkeypatch) -> None:
    """A real data job's output directory is input as it is for both kinds, named as the
    directory or as a glob of it: each job reads exactly its reducer files (the data job's
    file list, the vertex job's input in its jobconfig), never ``_SUCCESS``, and sees each
    output line once."""
    monkeypatch.chdir(base)
    (base / "corpus.txt").write_text("a b a\nc d\n")
    with remap.connect(cores=2, settings=Settings()) as cluster:
        cluster.mapreduce(FUNCTIONS["mapreduce"], "corpus.txt", base / "prev", reducers=2)
        parts = [str(p) for p in sorted((base / "prev" / "default").iterdir())]
        lines = sorted(line for p in parts for line in Path(p).read_text().splitlines())
        assert (base / "prev" / "_SUCCESS").exists() and len(parts) == 2 and len(lines) == 4
        for n, entry in enumerate(["prev/", "prev/*"]):
            out = base / f"data-{n}"
            summary = cluster.mapreduce({"map": line_once, "reduce": total}, entry, out)
            config = json.loads((Path(summary["job_dir"]) / "jobconfig.json").read_text())
            assert config["files"] == parts, entry
            got = [
                line for p in sorted(out.rglob("reducer-*")) for line in p.read_text().splitlines()
            ]
            assert sorted(line.rsplit("\t", 1)[0] for line in got) == lines, entry

            out = base / f"vertex-{n}"
            result = cluster.vertex(FUNCTIONS["vertex"], entry, out)
            config = json.loads((Path(result.job_dir) / "jobconfig.json").read_text())
            assert config["input"] == parts, entry
            got = [line for p in sorted(out.glob("part-*")) for line in p.read_text().splitlines()]
            assert sorted(line.rsplit("\t", 1)[0] for line in got) == lines, entry
