"""``kind: mapreduce`` job files: strict keys with file:line:key errors, and module resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remap.data.jobspec import MapReduceSpec, to_job
from remap.errors import ConfigError
from remap.jobfile import JobSpec, load_job_text
from tests.test_jobfile import assert_bad_job

SOURCE = "jobs/mr.yaml"
K = "kind: mapreduce\nmodule: wc.py\ninput: in/\noutput: out/\n"
KO = "kind: mapreduce\noutput: out/\n"

WC = """\
def map(line):
    for w in line.split():
        yield w, 1

def reduce(word, counts):
    yield word, sum(counts)

def reduce_lengths(n, ones):
    yield n, sum(ones)
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "wc.py").write_text(WC)
    (tmp_path / "nomap.py").write_text("def reduce(k, v):\n    yield k\n")
    (tmp_path / "broken.py").write_text("def map(:\n")
    (tmp_path / "in").mkdir()
    return tmp_path


def test_full_job_file(base: Path) -> None:
    """Every key, resolved: paths against the job file, reducers per purpose, numbers as given."""
    text = (
        "kind: mapreduce\nmodule: wc.py\ninput: [in/, 'logs/*.txt']\noutput: out/\n"
        "reducers: {default: 8, lengths: 2}\nsplit_mb: 16\nspill_mb: 0.5\nfanin: 8\n"
        "on_error: continue\nretries: 1\ntimeout: 60\ngroup: big\npriority: 2\nname: wc\n"
    )
    (base / "logs").mkdir()
    (base / "logs" / "a.txt").write_text("x\n")
    spec = load_job_text(text, base, source=SOURCE)
    assert isinstance(spec, MapReduceSpec) and spec.kind == "mapreduce"
    assert spec.inputs == ("in/", "logs/*.txt")
    assert spec.output == (base / "out").resolve()
    assert dict(spec.reducers) == {"default": 8, "lengths": 2}
    o = spec.options
    assert (o.split_mb, o.spill_mb, o.fanin) == (16.0, 0.5, 8)
    assert (o.on_error, o.retries, o.timeout, o.group, o.priority, spec.name) == (
        "continue",
        1,
        60.0,
        "big",
        2,
        "wc",
    )
    job = to_job(spec)
    assert set(job.functions.reduce) == {"default", "lengths"}
    assert job.functions.reduce["lengths"].__name__ == "reduce_lengths"


def test_defaults_and_function_jobs_unchanged(base: Path) -> None:
    """Only the three required keys: one reducer, 64 MB splits and spills; no kind = function job."""
    spec = load_job_text(K, base, source=SOURCE)
    assert dict(spec.reducers) == {"default": 1} and spec.options.split_mb == 64.0
    assert spec.name == "mr"
    plain = load_job_text("function: wc.py:map\nargs: [1]\n", base, source=SOURCE)
    assert isinstance(plain, JobSpec) and plain.kind == "function"
    explicit = load_job_text("kind: function\nfunction: wc.py:map\nargs: [1]\n", base, SOURCE)
    assert isinstance(explicit, JobSpec)


ERROR_CASES = [
    pytest.param("kind: mapreduc  #!\nmodule: wc.py\n", ["key 'kind'", "did you mean 'mapreduce'"], id="kind-typo"),
    pytest.param("kind: mapreduce  #!\nmodule: wc.py\noutput: out/\n", ["key 'input' is required"], id="no-input"),
    pytest.param("kind: mapreduce  #!\ninput: in/\noutput: out/\n", ["key 'module' is required"], id="no-module"),
    pytest.param(K + "reducers: 0  #!\n", ["key 'reducers'", "reducer count >= 1, got 0"], id="reducers-zero"),
    pytest.param(K + "reducers: {default: 2, bad/name: 1}  #!\n", ["key 'reducers'", "purpose 'bad/name'"], id="purpose-path"),
    pytest.param(K + "reducers: {default: 2, _logs: 1}  #!\n", ["key 'reducers'", "purpose '_logs'", "starting with a letter"], id="purpose-hidden"),
    pytest.param(K + "reducers: {}  #!\n", ["key 'reducers'", "at least one"], id="reducers-empty"),
    pytest.param(K + "reducers: {a: true}  #!\n", ["key 'reducers'", "got True"], id="reducers-bool"),
    pytest.param(K + "split_mb: -1  #!\n", ["key 'split_mb'", "megabytes > 0"], id="split-negative"),
    pytest.param(K + "spill_mb: lots  #!\n", ["key 'spill_mb'", "megabytes > 0"], id="spill-text"),
    pytest.param(K + "fanin: 1  #!\n", ["key 'fanin'", "integer >= 2"], id="fanin-one"),
    pytest.param(KO + "module: wc.py\ninput: []  #!\n", ["key 'input'", "a file, a directory, a glob, or a non-empty list"], id="input-empty"),
    pytest.param(KO + "module: wc.py\ninput: [a, 3]  #!\n", ["key 'input'", "got 3"], id="input-number"),
    pytest.param(KO + "input: in/\nmodule: 'not a module!'  #!\n", ["key 'module'", "FILE.py or package.module"], id="module-form"),
    pytest.param(K + "args: [1]  #!\n", ["key 'args'", "not used by 'kind: mapreduce' jobs"], id="function-key"),
    pytest.param(K + "reducer: 3  #!\n", ["unknown key 'reducer'", "did you mean 'reducers'"], id="typo"),
    pytest.param("function: wc.py:map\nargs: [1]\nsplit_mb: 3  #!\n", ["key 'split_mb'", "not used by 'kind: function'"], id="data-key-in-function-job"),
    pytest.param(K + "on_error: ignore  #!\n", ["key 'on_error'", "fail, continue"], id="on-error"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_bad_mapreduce_job_names_line_and_key(base: Path, text: str, expected: list[str]) -> None:
    """Each mistake is one ConfigError line starting ``source:line:``."""
    assert_bad_job(text, base, SOURCE, expected)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("missing.py", "file not found"),
        ("nomap.py", "no 'map' function"),
        ("broken.py", "syntax error"),
        ("no_such_pkg.mod", "not found"),
    ],
)
def test_module_problems_name_the_module_key(base: Path, module: str, expected: str) -> None:
    """A module that is missing, broken or lacks map is an error at the 'module' key's line."""
    text = f"kind: mapreduce\ninput: in/\noutput: out/\nmodule: {module}\n"
    spec = load_job_text(text, base, source=SOURCE)
    with pytest.raises(ConfigError) as info:
        to_job(spec)
    assert str(info.value).startswith(f"{SOURCE}:4: key 'module': "), str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("key", "line", "text", "expected"),
    [
        ("output", 4, K, "already exists: a data job never overwrites"),
        ("input", 3, K.replace("in/", "nope/"), "no such file or directory"),
        ("input", 3, K.replace("in/", "'nope/*.txt'"), "no file matches"),
    ],
)
def test_output_and_input_problems_name_their_key(
    base: Path, key: str, line: int, text: str, expected: str
) -> None:
    """An existing output or a missing input is refused by to_job (before a cluster starts,
    which the console does after it), naming the file, line and key."""
    (base / "out").mkdir()
    if key == "input":
        (base / "out").rmdir()
    spec = load_job_text(text, base, source=SOURCE)
    with pytest.raises(ConfigError) as info:
        to_job(spec)
    assert str(info.value).startswith(f"{SOURCE}:{line}: key '{key}': "), str(info.value)
    assert expected in str(info.value)


class _Lines:
    """A console that keeps what it would print."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.err: list[str] = []

    def say(self, text: str) -> None:
        self.out.append(text)

    def note(self, text: str) -> None:
        self.err.append(text)


@pytest.mark.parametrize("as_json", [False, True])
def test_failed_records_under_continue_exit_5(as_json: bool) -> None:
    """Records that raised under on_error: continue exit 5, as a function job's failed
    arguments do (``compute --help``), also through ``attach``; a clean job exits 0."""
    from remap.console.filejob import print_summary

    summary = {
        "job": "j", "state": "OK", "output": "/o", "job_dir": "/d", "files": 1, "bytes": 3,
        "counters": {"map_records_in": 3, "map_errors": 1, "reduce_records_out": 2},
        "timings": {"total": 0.1},
    }  # fmt: skip
    console = _Lines()
    assert print_summary(console, "mapreduce", summary, as_json) == 5
    if not as_json:
        assert "errors.log (exit code 5)" in console.err[-1]
    summary["counters"]["map_errors"] = 0
    assert print_summary(_Lines(), "mapreduce", summary, as_json) == 0
    if not as_json:
        assert "3 records in 1 file (3 B)" in console.out[0], console.out


@pytest.mark.parametrize("killed", [False, True])
def test_failed_job_with_json_prints_one_object(killed: bool) -> None:
    """``compute --json`` of a data or vertex job that failed or was killed prints one JSON
    object on stdout (as a function job does); nothing without --json (the error line is
    main's)."""
    from remap.console.filejob import print_failure
    from remap.errors import JobFailed, JobKilled

    exc = JobKilled("killed on request") if killed else JobFailed("map raised ValueError")
    console = _Lines()
    print_failure(console, True, "vertex", "j1", exc)
    (line,) = console.out
    assert json.loads(line) == {
        "job": "j1", "kind": "vertex", "state": "killed" if killed else "failed",
        "error": str(exc), "exit_code": 1,
    }  # fmt: skip
    quiet = _Lines()
    print_failure(quiet, False, "vertex", "j1", exc)
    assert quiet.out == [] and quiet.err == []


def test_every_file_job_summary_names_its_job_as_job() -> None:
    """A script reads ``job`` from any ``compute --json`` object: a data job's summary, a
    failure's, and a vertex job's summary (which had only ``job_id``)."""
    from remap.vertex.driver import VertexResult

    result = VertexResult("done", 3, 10, 2, 2, 7, 70, 0, 0.1, "/o", "20261202-x", "/d")
    assert result.to_json()["job"] == result.to_json()["job_id"] == "20261202-x"


SHIPPED = {
    "mapreduce": (
        "import {helper}\n\ndef map(line):\n    yield {helper}.key(line), 1\n\n"
        "def reduce(k, ones):\n    yield k, sum(ones)\n"
    ),
    "vertex": (
        "import {helper}\n\ndef prepare(line):\n    return ({helper}.key(line), 0, [])\n\n"
        "def compute(ctx, vid, value, messages):\n    return value, True\n"
    ),
}


@pytest.mark.parametrize("kind", ["mapreduce", "vertex"])
def test_modules_and_files_keys_ship_as_a_function_jobs(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``modules:`` and ``files:`` are a data or vertex job's keys too (they were refused as
    'not used by kind: ...'): checked as a function job's, naming the key's line; the job's
    module may import a listed helper beside it (nothing else puts it on the path), and both
    are packed in the bundle the tasks ship (remap.bundle), as a function job's."""
    from remap.data.jobspec import shipped_with

    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    helper = f"shiphelp_{kind}"
    (tmp_path / "job.py").write_text(SHIPPED[kind].format(helper=helper))
    (tmp_path / f"{helper}.py").write_text("def key(line):\n    return line.split()[0]\n")
    (tmp_path / "table.csv").write_text("a,1\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("1 2\n")
    head = f"kind: {kind}\nmodule: job.py\ninput: in/\noutput: out/\n"
    spec = load_job_text(head + f"modules: [{helper}.py]\nfiles: [table.csv]\n", tmp_path)
    assert spec.modules == (f"{helper}.py",) and spec.files == (tmp_path / "table.csv",)
    if kind == "mapreduce":
        shipped = to_job(spec).bundle
    else:
        from remap.vertex.jobspec import to_run

        to_run(spec)
        shipped = shipped_with(spec)
    assert set(shipped.modules) == {f"{helper}.py"} and shipped.files == {"table.csv": b"a,1\n"}

    for key, value in (("modules", "[nope.py]"), ("files", "[nope.csv]")):
        with pytest.raises(ConfigError) as info:
            load_job_text(head + f"{key}: {value}  #!\n", tmp_path, source=SOURCE)
        assert str(info.value).startswith(f"{SOURCE}:5: key '{key}': "), str(info.value)
