"""Tests for remap.jobfile: strict validation, lazy arguments, function resolution, shipping.

Error cases mark the line the error must name with ``#!`` in the YAML itself, so each table row
carries its expected line next to the text that causes it.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remap.errors import ConfigError
from remap.jobfile import (
    JOB_KEYS,
    JobSpec,
    count_arguments,
    iter_arguments,
    load_callables,
    load_job,
    load_job_text,
    module_name_for,
    resolve_function,
)
from remap.sinks import SINK_MODES

SOURCE = "jobs/x.yaml"

FUNCS = """\
OFFSET = 10
NOT_CALLABLE = 5


class Point:
    def __init__(self, x):
        self.x = x


def helper(x):
    return x + OFFSET


def square(x):
    return x * x


def shifted(x):
    return Point(helper(x)).x * 2


def add(a, b):
    return a + b
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A job directory with a functions file and an argument file beside it."""
    (tmp_path / "funcs.py").write_text(FUNCS, encoding="utf-8")
    (tmp_path / "args.jsonl").write_text('1\n\n  \n[2, 3]\n{"a": 4}\n"five"\n', encoding="utf-8")
    return tmp_path


@pytest.fixture(autouse=True)
def forget_job_modules() -> Iterator[None]:
    """Each test loads its own files: drop job modules and their by-value registration after."""
    before = {name for name in sys.modules if name.startswith("remap_job_")}
    yield
    for name in [n for n in sys.modules if n.startswith("remap_job_") and n not in before]:
        module = sys.modules.pop(name)
        try:
            cloudpickle.unregister_pickle_by_value(module)
        except ValueError:
            pass


def marked_line(text: str) -> int:
    """The 1-based line carrying the ``#!`` marker."""
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if "#!" in line]
    assert len(lines) == 1, "each error case marks exactly one line"
    return lines[0]


def assert_bad_job(text: str, base: Path, source: str, expected: list[str]) -> None:
    """Loading ``text`` raises one ConfigError line starting ``source:line:`` (the line marked
    ``#!``) and containing every part of ``expected`` (shared by every kind's error table)."""
    with pytest.raises(ConfigError) as info:
        load_job_text(text, base, source=source)
    message = str(info.value)
    assert message.startswith(f"{source}:{marked_line(text)}: "), message
    for part in expected:
        assert part in message, message
    assert "\n" not in message


F = "function: funcs.py:square\n"
A = "args: [1, 2]\n"

ERROR_CASES = [
    # wrong types and values, one row per key
    pytest.param(F + A + "retries: three  #!\n", ["key 'retries'", "expected an integer >= 0, got 'three'"], id="retries-text"),
    pytest.param(F + A + "retries: true  #!\n", ["key 'retries'", "got true"], id="retries-bool-is-not-int"),
    pytest.param(F + A + "retries: -1  #!\n", ["key 'retries'", "expected an integer >= 0, got -1"], id="retries-negative"),
    pytest.param(F + A + "priority: 1.5  #!\n", ["key 'priority'", "expected an integer, got 1.5"], id="priority-float"),
    pytest.param(F + A + "priority: false  #!\n", ["key 'priority'", "expected an integer, got false"], id="priority-bool"),
    pytest.param(F + A + "max_cores: -1  #!\n", ["key 'max_cores'", "expected a number of cores >= 0 (0: no limit), got -1"], id="max-cores-negative"),
    pytest.param(F + A + "min_cores: two  #!\n", ["key 'min_cores'", "got 'two'"], id="min-cores-text"),
    pytest.param(F + A + "max_cores: 2\nmin_cores: 3  #!\n", ["key 'min_cores'", "min_cores 3 is more than max_cores 2"], id="min-over-max"),
    pytest.param(F + A + "chunksize: 0  #!\n", ["key 'chunksize'", "expected 'auto' or an integer >= 1, got 0"], id="chunksize-zero"),
    pytest.param(F + A + "chunksize: big  #!\n", ["key 'chunksize'", "got 'big'"], id="chunksize-text"),
    pytest.param(F + A + "chunksize: true  #!\n", ["key 'chunksize'", "got true"], id="chunksize-bool"),
    pytest.param(F + A + "timeout: 0  #!\n", ["key 'timeout'", "expected a number of seconds > 0, got 0"], id="timeout-zero"),
    pytest.param(F + A + "timeout: -2.5  #!\n", ["key 'timeout'", "got -2.5"], id="timeout-negative"),
    pytest.param(F + A + "timeout: 10s  #!\n", ["key 'timeout'", "got '10s'"], id="timeout-text"),
    pytest.param(F + A + "timeout: .inf  #!\n", ["key 'timeout'", "got inf"], id="timeout-infinite"),
    pytest.param(F + A + "timeout: yes  #!\n", ["key 'timeout'", "got true"], id="timeout-bool"),
    pytest.param(F + A + "star: 'yes'  #!\n", ["key 'star'", "expected true or false, got 'yes'"], id="star-text"),
    pytest.param(F + A + "detach: 1  #!\n", ["key 'detach'", "expected true or false, got 1"], id="detach-int"),
    pytest.param(F + A + "on_error: ignore  #!\n", ["key 'on_error'", "expected one of fail, continue, got 'ignore'"], id="on-error"),
    pytest.param(F + A + "group: 5  #!\n", ["key 'group'", "expected text, got 5"], id="group-int"),
    pytest.param(F + A + "group: no  #!\n", ["key 'group'", "got false", "quote it"], id="group-norway"),
    pytest.param(F + A + "name: ''  #!\n", ["key 'name'", "must not be empty"], id="name-empty"),
    pytest.param(F + A + "name: [a]  #!\n", ["key 'name'", "expected text"], id="name-list"),
    pytest.param(F + A + "output: 3  #!\nresponse_mode: file\n", ["key 'output'", "expected text, got 3"], id="output-int"),
    # response modes and what each needs
    pytest.param(F + A + "response_mode: json  #!\n", ["key 'response_mode'", "expected one of object, stream, sqlite, file, reduce, none, got 'json'"], id="mode-unknown"),
    pytest.param(F + A + "response_mode: Stream  #!\n", ["key 'response_mode'", "did you mean 'stream'?"], id="mode-case"),
    pytest.param(F + A + "response_mode: sqlite  #!\n", ["key 'response_mode'", "'sqlite' needs key 'output'"], id="sqlite-without-output"),
    pytest.param(F + A + "response_mode: file  #!\n", ["key 'response_mode'", "'file' needs key 'output'"], id="file-without-output"),
    pytest.param(F + A + "response_mode: reduce  #!\n", ["key 'response_mode'", "'reduce' needs key 'reduce'"], id="reduce-without-reduce"),
    pytest.param(F + A + "reduce: add  #!\n", ["key 'reduce'", "only used when response_mode is 'reduce', not 'object'"], id="reduce-in-object-mode"),
    pytest.param(F + A + "response_mode: stream\nreduce: add  #!\n", ["key 'reduce'", "not 'stream'"], id="reduce-in-stream-mode"),
    pytest.param(F + A + "output: out.db  #!\n", ["key 'output'", "not used when response_mode is 'object'"], id="output-in-object-mode"),
    # a stream goes to stdout: an output file would be silently ignored, so it is refused
    pytest.param(F + A + "response_mode: stream\noutput: out/r.jsonl  #!\n", ["key 'output'", "not used when response_mode is 'stream' (only file, sqlite)"], id="output-in-stream-mode"),
    pytest.param(F + A + "output: out/r.jsonl  #!\nresponse_mode: stream\n", ["key 'output'", "'stream'"], id="output-before-stream-mode"),
    pytest.param(F + A + "response_mode: none\noutput: o  #!\n", ["key 'output'", "not used when response_mode is 'none'"], id="output-in-none-mode"),
    pytest.param(F + A + "response_mode: reduce\nreduce: add\noutput: o  #!\n", ["key 'output'", "'reduce'"], id="output-in-reduce-mode"),
    # function and reduce references
    pytest.param("args: [1, 2]  #!\nname: n\n", ["key 'function' is required", "FILE.py:NAME"], id="function-missing"),
    pytest.param("function: funcs.py  #!\n" + A, ["key 'function'", "exactly one ':'", "got 'funcs.py'"], id="function-no-colon"),
    pytest.param("function: a.py:b:c  #!\n" + A, ["key 'function'", "exactly one ':'"], id="function-two-colons"),
    pytest.param("function: 'funcs.py:'  #!\n" + A, ["key 'function'", "identifier after ':'"], id="function-empty-name"),
    pytest.param("function: funcs.py:1st  #!\n" + A, ["key 'function'", "identifier after ':'"], id="function-bad-name"),
    pytest.param("function: funcs.py:def  #!\n" + A, ["key 'function'", "identifier after ':'"], id="function-keyword-name"),
    pytest.param("function: ':square'  #!\n" + A, ["key 'function'", "file or module before ':'"], id="function-empty-target"),
    pytest.param("function: my-mod:f  #!\n" + A, ["key 'function'", "neither a .py file nor a module name"], id="function-bad-module"),
    pytest.param("function: 42  #!\n" + A, ["key 'function'", "expected text, got 42"], id="function-not-text"),
    pytest.param(F + A + "response_mode: reduce\nreduce: a:b:c  #!\n", ["key 'reduce'", "exactly one ':'"], id="reduce-two-colons"),
    pytest.param(F + A + "response_mode: reduce\nreduce: 'x:'  #!\n", ["key 'reduce'", "identifier after ':'"], id="reduce-empty-name"),
    pytest.param(F + A + "response_mode: reduce\nreduce: two words  #!\n", ["key 'reduce'", "identifier"], id="reduce-bare-not-identifier"),
    # argument sources
    pytest.param("function: funcs.py:square  #!\nretries: 1\n", ["no argument source", "'args', 'args_path', 'args_range'"], id="no-source"),
    pytest.param(F + A + "args_range: [0, 3]  #!\n", ["keys 'args', 'args_range'", "exactly one"], id="two-sources"),
    pytest.param(F + "args_range: [0, 3]\n" + "args_path: args.jsonl\n" + A.replace("\n", "  #!\n"), ["keys 'args', 'args_path', 'args_range'"], id="three-sources"),
    pytest.param(F + "args: 5  #!\n", ["key 'args'", "expected a list of arguments, got 5"], id="args-not-list"),
    pytest.param(F + "args: {a: 1}  #!\n", ["key 'args'", "expected a list"], id="args-mapping"),
    pytest.param(F + "args_path: missing.jsonl  #!\n", ["key 'args_path'", "file not found", "missing.jsonl"], id="args-path-missing"),
    pytest.param(F + "args_path: .  #!\n", ["key 'args_path'", "is a directory"], id="args-path-directory"),
    pytest.param(F + "args_path: 7  #!\n", ["key 'args_path'", "expected text, got 7"], id="args-path-not-text"),
    pytest.param(F + "args_range: [1]  #!\n", ["key 'args_range'", "[start, stop] or [start, stop, step]"], id="range-one"),
    pytest.param(F + "args_range: [1, 2, 3, 4]  #!\n", ["key 'args_range'", "got [1, 2, 3, 4]"], id="range-four"),
    pytest.param(F + "args_range: 10  #!\n", ["key 'args_range'", "got 10"], id="range-scalar"),
    pytest.param(F + "args_range: [0, 10, 0]  #!\n", ["key 'args_range'", "step must not be 0"], id="range-step-zero"),
    pytest.param(F + "args_range: [0, 1.5]  #!\n", ["key 'args_range'", "expected integers, got 1.5"], id="range-float"),
    pytest.param(F + "args_range: [true, 3]  #!\n", ["key 'args_range'", "got true"], id="range-bool"),
    pytest.param(F + "args_range:\n  - 0\n  - ten  #!\n", ["key 'args_range'", "got 'ten'"], id="range-item-line"),
    pytest.param(F + "args_range: [0, 3]\nstar: true  #!\n", ["key 'star'", "cannot unpack the integers"], id="star-with-range"),
    pytest.param(F + "star: true\nargs:\n  - [1, 2]\n  - {a: 1}\n  - 3  #!\n", ["key 'args'", "item 2 must be a list or a mapping", "got 3"], id="star-item-line"),
    # keys
    pytest.param(F + A + "retry: 3  #!\n", ["unknown key 'retry'", "did you mean 'retries'?"], id="unknown-key-suggests"),
    pytest.param(F + A + "respons_mode: stream  #!\n", ["unknown key 'respons_mode'", "did you mean 'response_mode'?"], id="unknown-key-suggests-mode"),
    pytest.param(F + A + "zzz: 3  #!\n", ["unknown key 'zzz'", "known keys: function, args"], id="unknown-key-lists"),
    pytest.param(F + A + "args: [3]  #!\n", ["key 'args'", "given twice (first on line 2)"], id="duplicate-key"),
    pytest.param(F + A + "7: x  #!\n", ["key '7'", "keys must be plain text"], id="key-not-text"),
    # document shape and YAML syntax
    pytest.param("- function: funcs.py:square  #!\n", ["expected a mapping", "got a list"], id="top-level-list"),
    pytest.param("just text  #!\n", ["expected a mapping", "got a single value"], id="top-level-scalar"),
    pytest.param("# only a comment  #!\n", ["job file is empty"], id="empty"),
    pytest.param(F + "args: [1, 2\nretries: 3  #!\n", ["invalid YAML", "flow sequence started on line 2"], id="yaml-unclosed"),
    pytest.param(F + "args:\n\t- 1  #!\n", ["invalid YAML", "found character '\\t'"], id="yaml-tab"),
    pytest.param(F + "retries: !!python/object:os.system x  #!\n" + A, ["invalid YAML", "python/object"], id="yaml-unsafe-tag"),
    pytest.param(F + A + "---  #!\nfunction: other.py:f\n", ["invalid YAML", "single document"], id="yaml-two-documents"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_bad_job_names_source_line_and_key(base: Path, text: str, expected: list[str]) -> None:
    """Each mistake is one ConfigError starting ``source:line:``, naming the key and the problem."""
    assert_bad_job(text, base, SOURCE, expected)


def test_a_python_file_given_as_the_job_file_says_how_to_name_it(tmp_path: Path) -> None:
    """``compute myjob.py`` (the function's file, not the job file) says to write a YAML job
    file naming it; read as YAML it said "unknown key 'def score(x)'"."""
    path = tmp_path / "myjob.py"
    path.write_text("def score(x):\n    return x * x\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value) == (
        f"{path}: is Python, not a job file: write a YAML job file that names it "
        "(function: myjob.py:NAME, or module: myjob.py for a data or vertex job)"
    )


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param(None, "job file not found", id="missing"),
        pytest.param("directory", "is a directory", id="directory"),
        pytest.param(
            b"function: a.py:f\nname: \xff\xfe\n", ":2: job file is not valid UTF-8", id="not-utf8"
        ),
    ],
)
def test_load_job_file_errors(tmp_path: Path, setup: bytes | str | None, expected: str) -> None:
    """A job file that cannot be read is a ConfigError naming the path as the user gave it."""
    path = tmp_path / "job.yaml"
    if setup == "directory":
        path.mkdir()
    elif isinstance(setup, bytes):
        path.write_bytes(setup)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


# --- good files -----------------------------------------------------------------------------------

GOOD_CASES = [
    pytest.param(
        F + "args: [1, [2, 3], {a: b}, null]\n",
        {"args": [1, [2, 3], {"a": "b"}, None], "response_mode": "object", "retries": 3},
        [1, [2, 3], {"a": "b"}, None],
        4,
        id="inline-args-defaults",
    ),
    pytest.param(
        F + "args_path: args.jsonl\n",
        {"args": None, "args_range": None},
        [1, [2, 3], {"a": 4}, "five"],
        None,
        id="args-path",
    ),
    pytest.param(
        F + "args_range: [2, 6]\n", {"args_range": (2, 6, 1)}, [2, 3, 4, 5], 4, id="range-default-step"
    ),
    pytest.param(
        F + "args_range: [10, 0, -3]\n", {"args_range": (10, 0, -3)}, [10, 7, 4, 1], 4, id="range-step"
    ),
    pytest.param(F + "args_range: [5, 5]\n", {}, [], 0, id="range-empty"),
    pytest.param(
        F + "args: [[1, 2], {a: 1}]\nstar: true\n", {"star": True}, [[1, 2], {"a": 1}], 2, id="star"
    ),
    pytest.param(F + A + "response_mode: stream\n", {"response_mode": "stream", "output": None}, [1, 2], 2, id="stream"),
    pytest.param(F + A + "response_mode: sqlite\noutput: r.db\n", {"response_mode": "sqlite"}, [1, 2], 2, id="sqlite"),
    pytest.param(F + A + "response_mode: file\noutput: results\n", {"response_mode": "file"}, [1, 2], 2, id="file"),
    pytest.param(F + A + "response_mode: reduce\nreduce: add\n", {"response_mode": "reduce", "reduce": "add"}, [1, 2], 2, id="reduce-bare"),
    pytest.param(F + A + "response_mode: reduce\nreduce: operator:add\n", {"reduce": "operator:add"}, [1, 2], 2, id="reduce-module"),
    pytest.param(F + A + "response_mode: none\n", {"response_mode": "none"}, [1, 2], 2, id="none"),
    pytest.param(
        F + A + "chunksize: auto\nretries: 0\ntimeout: 30\non_error: continue\ngroup: gpu\n"
        "name: nightly\npriority: -2\ndetach: true\n",
        {"chunksize": None, "retries": 0, "timeout": 30.0, "on_error": "continue", "group": "gpu",
         "name": "nightly", "priority": -2, "detach": True},
        [1, 2],
        2,
        id="every-option",
    ),
    pytest.param(F + A + "max_cores: 8\nmin_cores: 2\n", {"max_cores": 8, "min_cores": 2}, [1, 2], 2, id="cores"),
    pytest.param(F + A + "max_cores: 0\n", {"max_cores": 0}, [1, 2], 2, id="cores-no-limit"),
    pytest.param(F + A + "chunksize: 64\ntimeout: 0.25\ngroup: null\n", {"chunksize": 64, "timeout": 0.25, "group": None}, [1, 2], 2, id="numbers"),
    pytest.param("function: json:dumps\n" + A, {"function": "json:dumps"}, [1, 2], 2, id="module-function"),
    pytest.param("function: pkg.sub_mod:run_it\n" + A, {"function": "pkg.sub_mod:run_it"}, [1, 2], 2, id="dotted-module"),
    pytest.param("# a job\n\n" + F + A, {"name": "x"}, [1, 2], 2, id="name-from-source"),
]  # fmt: skip


def option_or_field(spec: JobSpec, key: str) -> Any:
    """A job-file key's value: a JobSpec field, or the job option it sets."""
    if hasattr(spec, key):
        return getattr(spec, key)
    return getattr(spec.options, {"response_mode": "mode"}.get(key, key))


@pytest.mark.parametrize(("text", "fields", "arguments", "count"), GOOD_CASES)
def test_good_job(
    base: Path, text: str, fields: dict[str, Any], arguments: list[Any], count: int | None
) -> None:
    """Valid files load into the expected JobSpec, and their arguments and count come out right."""
    spec = load_job_text(text, base, source=SOURCE)
    for key, value in fields.items():
        got = option_or_field(spec, key)
        assert got == value, key
        assert type(got.value if isinstance(got, Enum) else got) is type(value), key
    assert list(iter_arguments(spec)) == arguments
    assert count_arguments(spec) == count


def test_paths_resolve_against_job_directory(
    base: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are relative to the job file, not to wherever the console was started."""
    job = base / "job.yaml"
    job.write_text(F + "args_path: args.jsonl\nresponse_mode: sqlite\noutput: out/r.db\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    spec = load_job(job)
    assert spec.base_dir == base.resolve()
    assert spec.args_path == (base / "args.jsonl").resolve()
    assert spec.output == (base / "out" / "r.db").resolve()
    assert (spec.options.name, spec.source, spec.function) == ("job", str(job), "funcs.py:square")


def test_load_job_relative_path_keeps_source_as_given(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors quote the path the user typed, and name defaults to the file's stem."""
    (base / "jobs").mkdir()
    (base / "jobs" / "nightly.yaml").write_text(
        "function: ../funcs.py:square\nargs: [1]\nretries: x\n"
    )
    monkeypatch.chdir(base)
    with pytest.raises(ConfigError, match=r"^jobs/nightly\.yaml:3: key 'retries'"):
        load_job("jobs/nightly.yaml")
    (base / "jobs" / "nightly.yaml").write_text("function: ../funcs.py:square\nargs: [1]\n")
    spec = load_job("jobs/nightly.yaml")
    assert (spec.options.name, spec.source) == ("nightly", "jobs/nightly.yaml")
    assert spec.base_dir == (base / "jobs").resolve()
    assert load_callables(spec)[0](3) == 9


def test_absolute_output_path_is_kept(base: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An absolute output path is used as is, not joined to the job directory."""
    target = tmp_path_factory.mktemp("results") / "r.db"
    spec = load_job_text(F + A + f"response_mode: sqlite\noutput: {target}\n", base)
    assert spec.output == target.resolve()


def test_text_job_defaults() -> None:
    """A job given as text is named after its source and keeps the given base directory."""
    spec = load_job_text("function: json:dumps\nargs: []\n", Path("/"))
    assert isinstance(spec, JobSpec)
    assert (spec.options.name, spec.source, spec.base_dir, spec.args) == (
        "job",
        "<job>",
        Path("/"),
        [],
    )


def test_every_key_is_known() -> None:
    """The loader accepts exactly the JobSpec fields that come from YAML (not base_dir etc.)
    and the job options (declared once, in protocol/options.py), but not the options a console
    sets at submit time (wait_for_nodes) nor the ones for vertex workers and file jobs."""
    from dataclasses import fields

    from protocol.options import OPTION_FIELDS

    internal = {"base_dir", "source", "key_lines", "options"}
    options = {f.name for f in OPTION_FIELDS} - {
        "wait_for_nodes",
        "gang",
        "mode",
        "data_dir",
        "data_id",
    }
    expected = ({f.name for f in fields(JobSpec)} - internal) | options | {"response_mode"}
    assert set(JOB_KEYS) == expected
    assert SINK_MODES == ("object", "stream", "sqlite", "file", "reduce", "none")


# --- arguments from a file ------------------------------------------------------------------------


def job_with_args_file(base: Path, content: bytes, *, star: bool = False) -> JobSpec:
    (base / "in.jsonl").write_bytes(content)
    return load_job_text(F + f"args_path: in.jsonl\nstar: {str(star).lower()}\n", base)


@pytest.mark.parametrize(
    ("content", "star", "good", "expected"),
    [
        pytest.param(b"1\n2\n{bad\n4\n", False, [1, 2], ":3: invalid JSON argument", id="bad-json"),
        pytest.param(
            b"1\n\n\n[1,\n", False, [1], ":4: invalid JSON argument", id="line-counts-blanks"
        ),
        pytest.param(b'"a"\n"\xff"\n', False, ["a"], ":2: not valid UTF-8", id="bad-utf8"),
        pytest.param(b"[1]\n{}\n3\n", True, [[1], {}], ":3: 'star' is true", id="star-needs-list"),
        pytest.param(b"1 2\n", False, [], ":1: invalid JSON argument", id="two-values-one-line"),
    ],
)
def test_bad_argument_line(
    base: Path, content: bytes, star: bool, good: list[Any], expected: str
) -> None:
    """Lines before a bad one are yielded; the bad one is a ConfigError naming file and line."""
    spec = job_with_args_file(base, content, star=star)
    iterator = iter_arguments(spec)
    got = [next(iterator) for _ in good]
    with pytest.raises(ConfigError) as info:
        next(iterator)
    assert got == good
    assert str(info.value).startswith(str(spec.args_path) + expected)


def test_argument_file_with_bom_crlf_and_blank_lines(base: Path) -> None:
    """A BOM, CRLF line ends and whitespace-only lines do not disturb the values."""
    spec = job_with_args_file(base, b'\xef\xbb\xbf{"k": 1}\r\n \t\r\n[1.5, null]\r\n')
    assert list(iter_arguments(spec)) == [{"k": 1}, [1.5, None]]


def test_argument_file_deleted_after_load(base: Path) -> None:
    """A file that vanishes between load and run is a ConfigError, not an OSError traceback."""
    spec = job_with_args_file(base, b"1\n")
    spec.args_path.unlink()
    with pytest.raises(ConfigError, match="cannot read arguments"):
        list(iter_arguments(spec))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=10,
)

NO_FIXTURE_CHECK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@NO_FIXTURE_CHECK
@given(values=st.lists(JSON_VALUES, max_size=20))
def test_argument_file_round_trips_any_json(values: list[Any]) -> None:
    """Any JSON values written one per line come back equal and in order."""
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        content = "".join(json.dumps(value) + "\n" for value in values)
        (base / "in.jsonl").write_text(content, encoding="utf-8")
        spec = load_job_text(F + "args_path: in.jsonl\n", base)
        assert list(iter_arguments(spec)) == values
        assert count_arguments(spec) is None


@NO_FIXTURE_CHECK
@given(
    start=st.integers(-1000, 1000),
    stop=st.integers(-1000, 1000),
    step=st.integers(-50, 50).filter(bool) | st.none(),
)
def test_args_range_matches_python_range(start: int, stop: int, step: int | None) -> None:
    """args_range means exactly Python's range(), and its count is known without iterating."""
    bounds = [start, stop] if step is None else [start, stop, step]
    spec = load_job_text(F + f"args_range: {bounds}\n", Path("/"))
    expected = list(range(*bounds))
    assert list(iter_arguments(spec)) == expected
    assert count_arguments(spec) == len(expected)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_argument_file_is_streamed_not_read_whole(base: Path) -> None:
    """The first argument is yielded while the file is still being written (never read whole).

    The argument file is a named pipe: the writer sends one line and waits to be released by the
    reader. A loader that reads to end of file could not return the first argument until the
    writer gave up waiting, and then ``released`` would be False.
    """
    fifo = base / "args.fifo"
    os.mkfifo(fifo)
    spec = load_job_text(F + "args_path: args.fifo\n", base)  # must not open the pipe
    release = threading.Event()
    outcome: dict[str, bool] = {}

    def writer() -> None:
        with open(fifo, "w", encoding="utf-8") as handle:
            handle.write("[1, 2]\n")
            handle.flush()
            outcome["released"] = release.wait(timeout=30)
            handle.write('\n"second"\n')

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    arguments = iter_arguments(spec)
    first = next(arguments)
    release.set()
    rest = list(arguments)
    thread.join(timeout=30)
    assert first == [1, 2]
    assert rest == ["second"]
    assert outcome == {"released": True}


def test_iter_arguments_opens_nothing_until_iterated(base: Path) -> None:
    """Asking for the iterator does no I/O: the file is opened on the first argument."""
    spec = job_with_args_file(base, b"1\n")
    spec.args_path.unlink()
    arguments = iter_arguments(spec)  # no error yet
    with pytest.raises(ConfigError):
        next(arguments)


# --- functions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "argument", "expected"),
    [
        ("funcs.py:square", 7, 49),
        ("funcs.py:shifted", 1, 22),
        ("funcs.py:Point", 3, None),
        ("json:dumps", [1], "[1]"),
        ("os.path:basename", "/a/b.txt", "b.txt"),
    ],
)
def test_resolve_function(base: Path, ref: str, argument: Any, expected: Any) -> None:
    """File and module references both resolve to the callable they name."""
    function = resolve_function(ref, base)
    result = function(argument)
    if expected is None:
        assert type(result).__name__ == "Point"
    else:
        assert result == expected


def test_module_reference_returns_the_real_object() -> None:
    """A module reference is a plain import: the very same object, not a copy."""
    assert resolve_function("json:dumps", Path("/")) is json.dumps


def test_same_file_loads_once(base: Path) -> None:
    """Resolving from one file twice reuses its module, so module state is not run twice."""
    first = resolve_function("funcs.py:square", base)
    second = resolve_function("funcs.py:add", base)
    name = module_name_for(base / "funcs.py")
    assert name.startswith("remap_job_")
    assert first.__module__ == second.__module__ == name
    assert sys.modules[name].add is second
    assert resolve_function("./funcs.py:square", base) is first


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [("add", "same-file"), ("funcs.py:add", "same-file"), ("operator:add", operator.add)],
)
def test_load_callables_with_reduce(base: Path, reduce: str, expected: Any) -> None:
    """A bare reduce name comes from the function's own file; a full reference from anywhere."""
    spec = load_job_text(F + A + f"response_mode: reduce\nreduce: {reduce}\n", base)
    function, reducer = load_callables(spec)
    assert function(3) == 9
    if expected == "same-file":
        assert reducer.__module__ == function.__module__
    else:
        assert reducer is expected
    assert reducer(2, 3) == 5


def test_load_callables_without_reduce(base: Path) -> None:
    """Without a reduce mode the second callable is None."""
    function, reducer = load_callables(load_job_text(F + A, base))
    assert (function(4), reducer) == (16, None)


CALLABLE_ERRORS = [
    pytest.param({}, "function: nope.py:f  #!\n", ["key 'function'", "file not found", "nope.py"], id="file-missing"),
    pytest.param({"bad.py": "x = 1\ndef f(:\n    pass\n"}, "function: bad.py:f  #!\n", ["key 'function'", "syntax error in", "bad.py:2"], id="syntax-error"),
    pytest.param({"boom.py": "x = 1\n\nraise RuntimeError('boom')\n"}, "function: boom.py:f  #!\n", ["key 'function'", "boom.py:3", "RuntimeError: boom"], id="raises-on-import"),
    pytest.param({"quit.py": "import sys\nsys.exit(3)\n"}, "function: quit.py:f  #!\n", ["key 'function'", "quit.py:2", "SystemExit"], id="exits-on-import"),
    pytest.param({"dep.py": "import no_such_module_for_remap_tests\n"}, "function: dep.py:f  #!\n", ["key 'function'", "ModuleNotFoundError", "no_such_module_for_remap_tests"], id="import-inside-file"),
    pytest.param({}, "function: funcs.py:squar  #!\n", ["key 'function'", "no name 'squar'", "did you mean 'square'?"], id="name-missing"),
    pytest.param({}, "function: funcs.py:NOT_CALLABLE  #!\n", ["key 'function'", "'NOT_CALLABLE'", "not callable (it is int)"], id="not-callable"),
    pytest.param({}, "function: no_such_module_for_remap_tests:f  #!\n", ["key 'function'", "module 'no_such_module_for_remap_tests' not found"], id="module-missing"),
    pytest.param({"localmod_for_remap_tests.py": "def f(x):\n    return x\n"}, "function: localmod_for_remap_tests:f  #!\n", ["not found (localmod_for_remap_tests is next to the job file: list it under modules:"], id="module-beside-the-job-file"),
    pytest.param({}, "function: json:JSONDecodr  #!\n", ["key 'function'", "module 'json'", "did you mean 'JSONDecoder'?"], id="module-name-missing"),
    pytest.param({}, "function: json:decoder  #!\n", ["key 'function'", "not callable (it is module)"], id="module-attr-not-callable"),
    pytest.param({}, "function: funcs.py:square\nresponse_mode: reduce\nreduce: ad  #!\n", ["key 'reduce'", "no name 'ad'", "did you mean 'add'?"], id="reduce-missing"),
    pytest.param({}, "function: funcs.py:square\nresponse_mode: reduce\nreduce: gone.py:add  #!\n", ["key 'reduce'", "file not found"], id="reduce-file-missing"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "text", "expected"), CALLABLE_ERRORS)
def test_load_callables_errors(
    base: Path, files: dict[str, str], text: str, expected: list[str]
) -> None:
    """Failures to load user code are ConfigErrors naming the job file, the key's line and the cause."""
    for name, content in files.items():
        (base / name).write_text(content, encoding="utf-8")
    spec = load_job_text(text + A, base, source=SOURCE)
    with pytest.raises(ConfigError) as info:
        load_callables(spec)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}:{marked_line(text)}: "), message
    for part in expected:
        assert part in message, message
    for name in files:  # a failed import must not leave a half-run module behind
        assert module_name_for(base / name) not in sys.modules


def test_fixed_file_loads_after_failure(base: Path) -> None:
    """After an import error the user can fix the file and load again in the same process."""
    (base / "fix.py").write_text("raise ValueError('not yet')\n")
    with pytest.raises(ConfigError):
        resolve_function("fix.py:f", base)
    (base / "fix.py").write_text("def f(x):\n    return -x\n")
    assert resolve_function("fix.py:f", base)(2) == -2


@pytest.mark.slow
def test_file_function_ships_by_value(base: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A function from a job's .py file runs in a process that has neither the file nor module.

    The pickle is made while the file exists; then the file is deleted and the module dropped,
    and a fresh interpreter in another directory unpickles and calls it, helpers and all.
    """
    function = resolve_function("funcs.py:shifted", base)
    module_name = function.__module__
    payload = cloudpickle.dumps(function)
    (base / "funcs.py").unlink()
    del sys.modules[module_name]
    pickle_file = tmp_path_factory.mktemp("ship") / "f.pkl"
    pickle_file.write_bytes(payload)
    code = textwrap.dedent(
        """
        import pickle, sys
        name = sys.argv[2]
        with open(sys.argv[1], "rb") as handle:
            function = pickle.load(handle)
        assert name not in sys.modules, "the module must not exist here"
        print(function(5))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(pickle_file), module_name],
        cwd=pickle_file.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "30"  # (5 + OFFSET) * 2, through helper and Point


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("def f(x):\n    return x + 1\n", None, id="loads"),
        pytest.param(
            "x = 1\nraise RuntimeError('boom')\n",
            "error while importing module 'shipmod_for_remap_tests': RuntimeError: boom",
            id="raises",
        ),
        pytest.param("def f(:\n", "syntax error in", id="syntax-error"),
        pytest.param(
            "import no_such_module_for_remap_tests\n",
            "error while importing module 'shipmod_for_remap_tests': No module named "
            "'no_such_module_for_remap_tests'",
            id="its-own-import-fails",
        ),
    ],
)
def test_a_function_from_a_module_listed_under_modules(
    base: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str | None
) -> None:
    """``function: MODULE:NAME`` with the module listed under ``modules:`` imports it from the
    job's directory on the console; an error while importing it is one line naming the key."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the job's directory goes in front
    monkeypatch.delitem(sys.modules, "shipmod_for_remap_tests", raising=False)
    (base / "shipmod_for_remap_tests.py").write_text(source, encoding="utf-8")
    text = "modules: [shipmod_for_remap_tests.py]\nfunction: shipmod_for_remap_tests:f  #!\n" + A
    spec = load_job_text(text, base, source=SOURCE)
    try:
        if expected is None:
            assert load_callables(spec)[0](1) == 2
            assert sys.path[0] == str(base)
            return
        with pytest.raises(ConfigError) as info:
            load_callables(spec)
        assert str(info.value).startswith(f"{SOURCE}:2: key 'function': "), info.value
        assert expected in str(info.value)
    finally:
        sys.modules.pop("shipmod_for_remap_tests", None)


def test_an_empty_args_path_is_refused(base: Path) -> None:
    """``args_path: ''`` is refused at load (it would name the job's directory)."""
    assert_bad_job(
        F + "args_path: ''  #!\n", base, SOURCE, ["key 'args_path'", "must not be empty"]
    )
