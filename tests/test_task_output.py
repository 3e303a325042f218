"""What tasks print or log reaches whoever ran them, prefixed with node and core (issue 9, item 14).

A core keeps one stdout/stderr object for its whole life and swaps the buffer under it per
batch, so a logging handler made in the first batch still reaches the caller in the tenth.
"""

from __future__ import annotations

import io
import mmap
import re
import sys
from pathlib import Path

import pytest

import remap
from protocol import messages as m
from remap import taskoutput
from remap.blobs import dumps
from remap.node.core import SLOT, Core
from remap.settings import Settings
from remap.shipping import function_blob
from tests.cluster_harness import (
    CONSOLE_SCRIPT,
    JOBS,
    jobs_function,
    load_module,
    run_entry,
    write_job,
)

funcs = load_module(JOBS / "funcs.py")
LINE = re.compile(r"^\[(\S+) core (\d+)\] (print|stderr|logging) (\d+)$")


def said(text: str) -> set[tuple[str, int]]:
    """The (channel, argument) pairs of the prefixed task output lines in ``text``."""
    return {(m[3], int(m[4])) for m in map(LINE.match, text.splitlines()) if m}


def every_channel(args: range) -> set[tuple[str, int]]:
    return {(channel, x) for x in args for channel in ("print", "stderr", "logging")}


def test_a_logging_handler_made_in_one_batch_is_captured_in_the_next() -> None:
    """Three batches on one core: each batch's output has its own print, stderr and log line.
    Before, the handler made in batch 1 kept writing into batch 1's buffer."""
    core = Core(mmap.mmap(-1, SLOT.size))
    core.load(m.CoreLoad(job=1, payload=function_blob(funcs.talkative, None)))
    outputs = []
    for x in range(3):
        payload = dumps(x)
        reply = core.run(m.Task(task=x, job=1, sizes=[len(payload)], payload=payload))
        outputs.append(reply.output)
    for x, out in enumerate(outputs):
        assert out == f"print {x}\nstderr {x}\nlogging {x}\n", outputs
    assert sys.stderr is not core.output, "the batch's streams are put back"


def test_prefix_lines_names_each_line() -> None:
    """Each line gets the prefix, and a last line without a newline gets one."""
    assert taskoutput.prefix_lines("a\nb", "[n core 1] ") == "[n core 1] a\n[n core 1] b\n"
    assert taskoutput.prefix_lines("", "[n core 1] ") == ""


def test_the_printer_writes_off_the_calling_thread() -> None:
    """OutputPrinter.put only queues; its thread writes, and flush() waits for it."""
    out = io.StringIO()
    printer = taskoutput.OutputPrinter(lambda: out)
    printer.put(0, "[n core 0] hello\n")
    assert printer.flush(10)
    assert out.getvalue() == "[n core 0] hello\n"


@pytest.mark.slow
def test_the_python_api_shows_task_output_from_every_batch(capsys: pytest.CaptureFixture) -> None:
    """print, stderr and logging of every call reach the caller's stderr, prefixed, before map
    returns; off on request. Before, the Python API showed nothing at all."""
    with remap.connect(cores=1, settings=Settings()) as cluster:
        assert cluster.map(funcs.talkative, range(4), chunksize=1) == list(range(4))
        err = capsys.readouterr().err  # written before map returned its results
        assert said(err) == every_channel(range(4)), err
        assert {m[2] for m in map(LINE.match, err.splitlines()) if m} == {"0"}
    with remap.connect(cores=1, settings=Settings(), task_output=False) as quiet:
        assert quiet.map(funcs.talkative, range(2), chunksize=1) == [0, 1]
        assert taskoutput.printer.flush(10)
        assert said(capsys.readouterr().err) == set()


@pytest.mark.slow
def test_the_console_shows_task_output_from_every_batch(tmp_path: Path) -> None:
    """Through the console, every batch's log lines show (not the first batch's only), and
    --no-task-output or REMAP_TASK_OUTPUT=false hide them."""
    job = write_job(
        tmp_path / "talk.yaml",
        {"function": jobs_function("funcs", "talkative"), "args_range": [0, 4], "chunksize": 1},
    )
    common = ("--env-file", "/dev/null", "--cores", "1", "compute", job, "--json")
    done = run_entry(CONSOLE_SCRIPT, *common, home=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert said(done.stderr) == every_channel(range(4)), done.stderr
    quiet = run_entry(CONSOLE_SCRIPT, *common, "--no-task-output", home=tmp_path, timeout=120)
    assert quiet.returncode == 0 and said(quiet.stderr) == set(), quiet.stderr
    env = {"REMAP_TASK_OUTPUT": "false"}
    quiet = run_entry(CONSOLE_SCRIPT, *common, home=tmp_path, env=env, timeout=120)
    assert quiet.returncode == 0 and said(quiet.stderr) == set(), quiet.stderr


FILE_JOB_MODULE = """
import logging
import sys


def map(line):
    print("print", line)
    yield line, 1


def reduce(key, values):
    print("stderr", key, file=sys.stderr)
    yield key, sum(values)


def prepare(line):
    log = logging.getLogger("remap.tests.talkjob")
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
        log.propagate = False
    log.warning("logging %s", line)
    return int(line), None, []


def compute(ctx, vertex_id, value, messages):
    return value, True
"""


def _file_job_module(tmp_path: Path) -> Path:
    """A module that is both a data job (map, reduce) and a vertex job (prepare, compute),
    each role printing or logging one line per record, and its input ``in/`` (lines 0..3)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "numbers.txt").write_text("".join(f"{x}\n" for x in range(4)))
    path = tmp_path / "talkjob.py"
    path.write_text(FILE_JOB_MODULE)
    return path


@pytest.mark.slow
def test_data_and_vertex_jobs_show_task_output_in_the_python_api(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What map and reduce print and what prepare logs reach the caller's stderr, prefixed,
    before mapreduce() and vertex() return. Before, data and vertex jobs showed nothing."""
    module = load_module(_file_job_module(tmp_path))
    monkeypatch.setitem(sys.modules, module.__name__, module)  # shipped by value from there
    data = tmp_path / "data"
    with remap.connect(cores=1, settings=Settings()) as cluster:
        summary = cluster.mapreduce(module, tmp_path / "in", tmp_path / "out", data_dir=data)
        assert summary["state"] == "OK"
        err = capsys.readouterr().err
        assert said(err) == {(ch, x) for x in range(4) for ch in ("print", "stderr")}, err
        cluster.vertex(module, tmp_path / "in", tmp_path / "vout", data_dir=data)
        err = capsys.readouterr().err
        assert said(err) == {("logging", x) for x in range(4)}, err


@pytest.mark.slow
def test_the_console_shows_task_output_of_data_and_vertex_jobs(tmp_path: Path) -> None:
    """``compute`` of a data job shows what map and reduce print, of a vertex job what prepare
    logs, each line prefixed; --no-task-output hides it. Before, both showed nothing."""
    _file_job_module(tmp_path)
    data_job = write_job(
        tmp_path / "data.yaml", "kind: mapreduce\nmodule: talkjob.py\ninput: in/\noutput: out/\n"
    )
    vertex_job = write_job(
        tmp_path / "vertex.yaml", "kind: vertex\nmodule: talkjob.py\ninput: in/\noutput: vout/\n"
    )
    common = ("--env-file", "/dev/null", "--cores", "1", "compute")
    done = run_entry(CONSOLE_SCRIPT, *common, data_job, home=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert said(done.stderr) == {(ch, x) for x in range(4) for ch in ("print", "stderr")}
    done = run_entry(CONSOLE_SCRIPT, *common, vertex_job, home=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert said(done.stderr) == {("logging", x) for x in range(4)}, done.stderr
    data_job.write_text(data_job.read_text().replace("out/", "out2/"))  # out/ exists now
    quiet = run_entry(
        CONSOLE_SCRIPT, *common, data_job, "--no-task-output", home=tmp_path, timeout=120
    )
    assert quiet.returncode == 0 and said(quiet.stderr) == set(), quiet.stderr
