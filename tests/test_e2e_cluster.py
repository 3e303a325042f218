"""End to end: a real server, two real nodes and console processes on 127.0.0.1.

One cluster serves the whole module (tests that do not disturb it share it): a node
``plain`` with two cores and a node ``gpu`` with one core in group ``gpu``; each node's
processes carry ``TEST_NODE_NAME`` so a job can tell where it ran. Every expectation is
computed locally by calling the same function the cluster runs.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

import remap
from remap.settings import Settings
from remap.sinks import lock_path
from tests.cluster_harness import (
    JOBS,
    NODE_SCRIPT,
    PYTHON,
    Cluster,
    ClusterFactory,
    NodeSpec,
    jobs_function,
    load_module,
    run_process,
    write_job,
)

funcs = load_module(
    JOBS / "funcs.py"
)  # the functions the cluster runs, to compute expectations here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The module's cluster: ``plain`` (2 cores) and ``gpu`` (1 core, group gpu)."""
    nodes = [
        NodeSpec(cores=2, env={"TEST_NODE_NAME": "plain"}),
        NodeSpec(cores=1, group="gpu", env={"TEST_NODE_NAME": "gpu"}),
    ]
    with Cluster(tmp_path_factory.mktemp("e2e"), nodes) as cluster:
        yield cluster


def job(directory: Path, function: str, **keys: Any) -> Path:
    """Write a job file for ``tests/jobs/funcs.py:FUNCTION`` with a unique name; return its path."""
    name = keys.pop("name", None) or f"{function}-{uuid.uuid4().hex[:8]}"
    return write_job(
        directory / f"{name}.yaml",
        {"function": jobs_function("funcs", function), "name": name, **keys},
    )


def compute(cluster: Cluster, job_file: Path, *flags: str, timeout: float = 60.0, ok: bool = True):
    done = cluster.console("compute", str(job_file), *flags, timeout=timeout)
    if ok:
        cluster.assert_ok(done)
    return done


def no_traceback(done) -> None:
    assert "Traceback" not in done.stderr, f"a Python traceback reached the user:\n{done.stderr}"


def error_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------------- the cluster itself


def test_status_json_lists_both_nodes(shared: Cluster) -> None:
    """`status --json` has a `nodes` list with both node processes, their cores and groups."""
    status = shared.status()
    nodes = status["nodes"]
    assert len(nodes) == 2, status
    by_pid = {n["pid"]: n for n in nodes}
    plain, gpu = (by_pid[child.pid] for child in shared.nodes)
    assert (plain["cores"], plain["group"]) == (2, None)
    assert (gpu["cores"], gpu["group"]) == (1, "gpu")
    assert isinstance(status["jobs"], list)


# ---------------------------------------------------------------------- response modes


def test_object_mode_prints_one_json_array_in_argument_order(
    shared: Cluster, tmp_path: Path
) -> None:
    """object + --json: stdout is exactly one JSON array, results in argument order."""
    args = list(range(-5, 60))
    done = compute(shared, job(tmp_path, "square", args=args), "--json")
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert json.loads(lines[0]) == [funcs.square(x) for x in args]


def test_object_mode_text_prints_one_result_per_line(shared: Cluster, tmp_path: Path) -> None:
    """object without --json: one JSON value per line, in argument order."""
    args = [3, 1, 2]
    done = compute(shared, job(tmp_path, "combine", args=args))
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        funcs.combine(x) for x in args
    ]


def test_stream_mode_json_gives_every_index_exactly_once(shared: Cluster, tmp_path: Path) -> None:
    """stream + --json: one JSON object per line with index and result; all indices once."""
    args = list(range(100, 180))
    done = compute(shared, job(tmp_path, "square", args=args, response_mode="stream"), "--json")
    items = [json.loads(line) for line in done.stdout.splitlines()]
    indices = [item["index"] for item in items]
    assert sorted(indices) == list(range(len(args))), f"indices not exactly once: {indices}"
    assert {item["index"]: item["result"] for item in items} == {
        i: funcs.square(x) for i, x in enumerate(args)
    }


def test_sqlite_mode_has_every_row_when_the_command_returns(
    shared: Cluster, tmp_path: Path
) -> None:
    """sqlite: when compute returns, `results` holds every argument's row, numbers stored as
    SQLite numbers (so SQL compares them as numbers), errors as JSON with a NULL result."""
    args = list(range(50, 90))
    job_file = job(
        tmp_path,
        "fail_on_3_mod_7",
        args=args,
        response_mode="sqlite",
        output="out.sqlite",
        on_error="continue",
    )
    done = compute(shared, job_file, "--json", ok=False)
    assert done.returncode == 5, shared.explain(done)  # finished, with failed arguments
    with closing(sqlite3.connect(tmp_path / "out.sqlite")) as db:
        rows = db.execute(
            "SELECT idx, argument, argument_type, result, result_type, error"
            " FROM results ORDER BY idx"
        ).fetchall()
        over = db.execute("SELECT count(*) FROM results WHERE result > 150").fetchone()[0]
    assert [r[0] for r in rows] == list(range(len(args)))
    for (_idx, argument, arg_type, result, result_type, error), x in zip(rows, args, strict=True):
        assert (argument, arg_type) == (x, "int")
        if x % 7 == 3:
            assert (result, result_type) == (None, None)
            assert json.loads(error)["type"] == "ValueError"
            assert json.loads(error)["message"] == f"{x} is 3 mod 7"
        else:
            assert error is None
            assert (result, result_type) == (funcs.fail_on_3_mod_7(x), "int")
    expected = [funcs.fail_on_3_mod_7(x) for x in args if x % 7 != 3]
    assert over == sum(1 for v in expected if v > 150)  # JSON text would count them all


def test_file_mode_writes_json_lines_in_argument_order(shared: Cluster, tmp_path: Path) -> None:
    """file: the output file has one JSON line per argument, sorted by index."""
    args = [{"k": i} for i in range(40)]
    compute(
        shared,
        job(tmp_path, "identity", args=args, response_mode="file", output="out.jsonl"),
        "--json",
    )
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"index": i, "result": x} for i, x in enumerate(args)
    ]


def test_reduce_mode_prints_the_folded_value(shared: Cluster, tmp_path: Path) -> None:
    """reduce: stdout is the fold of every result."""
    done = compute(
        shared,
        job(tmp_path, "square", args_range=[0, 500], response_mode="reduce", reduce="add"),
        "--json",
    )
    assert json.loads(done.stdout) == sum(funcs.square(x) for x in range(500))


def test_none_mode_counts_results(shared: Cluster, tmp_path: Path) -> None:
    """none: --json reports the count of results and nothing else of them; text says 'N results'."""
    job_file = job(tmp_path, "square", args_range=[0, 77], response_mode="none")
    summary = json.loads(compute(shared, job_file, "--json").stdout)
    assert (summary["done"], summary["failed"], summary["state"]) == (77, 0, "done")
    assert compute(shared, job_file).stdout.strip() == "77 results"


# ---------------------------------------------------------------------- argument sources


def test_args_path_large_file_is_fully_processed(shared: Cluster, tmp_path: Path) -> None:
    """args_path with 200,000 lines: every line's result comes back, in order (file mode)."""
    n = 200_000
    path = tmp_path / "args.jsonl"
    path.write_text("".join(f"{3 * i}\n" for i in range(n)))
    compute(
        shared,
        job(tmp_path, "square", args_path=str(path), response_mode="file", output="big.jsonl"),
        "--json",
        timeout=120,
    )
    with open(tmp_path / "big.jsonl") as f:
        for i, line in enumerate(f):
            assert json.loads(line) == {"index": i, "result": funcs.square(3 * i)}, f"line {i + 1}"
    assert i == n - 1


def test_args_inline_values_round_trip(shared: Cluster, tmp_path: Path) -> None:
    """args given inline: strings, lists, mappings, null, booleans and floats come back unchanged."""
    args = [1, "two", [3, 4], {"five": 5, "six": [6]}, None, True, False, 2.5, "üñíçødé", -7]
    done = compute(shared, job(tmp_path, "identity", args=args), "--json")
    assert json.loads(done.stdout) == args


@pytest.mark.parametrize("bounds", [[3, 60, 7], [20, -5, -4], [0, 10]])
def test_args_range_with_step(shared: Cluster, tmp_path: Path, bounds: list[int]) -> None:
    """args_range [start, stop(, step)] runs exactly range(start, stop, step)."""
    done = compute(shared, job(tmp_path, "square", args_range=bounds), "--json")
    assert json.loads(done.stdout) == [funcs.square(x) for x in range(*bounds)]


@pytest.mark.parametrize("source", ["args", "args_path"])
def test_star_unpacks_lists_and_mappings(shared: Cluster, tmp_path: Path, source: str) -> None:
    """star: true calls f(*list) and f(**mapping), from inline args and from an args file."""
    args = [[1, 2], {"a": 5, "c": 7}, [1, 2, 3], {}, [], {"b": "x"}]
    if source == "args":
        job_file = job(tmp_path, "combine", args=args, star=True)
    else:
        path = tmp_path / "star.jsonl"
        path.write_text("".join(json.dumps(a) + "\n" for a in args))
        job_file = job(tmp_path, "combine", args_path=str(path), star=True)
    done = compute(shared, job_file, "--json")
    expected = [funcs.combine(**a) if isinstance(a, dict) else funcs.combine(*a) for a in args]
    assert json.loads(done.stdout) == expected


# ---------------------------------------------------------------------- errors


def test_on_error_fail_stops_with_one_clear_line(shared: Cluster, tmp_path: Path) -> None:
    """on_error: fail -> non-zero exit and one stderr line naming the argument and the exception."""
    args = list(range(100, 130))  # 101, 108, 115, 122 raise
    failing = {i: x for i, x in enumerate(args) if x % 7 == 3}
    done = compute(
        shared, job(tmp_path, "fail_on_3_mod_7", args=args, on_error="fail"), "--json", ok=False
    )
    assert done.returncode != 0, shared.explain(done)
    no_traceback(done)
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    line = lines[0]
    hits = [(i, x) for i, x in failing.items() if f"{x} is 3 mod 7" in line]
    assert len(hits) == 1 and "ValueError" in line, line
    i, x = hits[0]
    named = line.replace(f"{x} is 3 mod 7", "")
    assert f"argument {i}" in named or f"argument {x}" in named, (
        f"the line does not name the argument: {line}"
    )
    summary = json.loads(done.stdout)  # --json still prints its summary, saying it failed
    assert (summary["state"], summary["exit_code"]) == ("failed", done.returncode), summary
    assert summary["error"] in line


def test_a_console_with_a_small_frame_limit_gets_its_results_or_one_line(
    shared: Cluster, tmp_path: Path
) -> None:
    """A console whose REMAP_MAX_FRAME (1 MiB) is far below the server's (256 MiB): a batch of
    results over it arrives all the same (run again one by one), and a single result of 2 MiB
    ends the job in one line naming the size, the limit and the setting, within seconds. It
    used to loop: the console refused the frame, dialled again, resumed the job, was sent the
    same frame again."""
    small = {"REMAP_MAX_FRAME": str(1 << 20)}
    batch = job(tmp_path, "kibibytes", args=[300] * 10, chunksize=10, response_mode="none")
    done = shared.console("compute", str(batch), "--json", env=small, timeout=60)
    shared.assert_ok(done)
    summary = json.loads(done.stdout)
    assert (summary["state"], summary["done"], summary["failed"]) == ("done", 10, 0), summary
    assert "reconnect" not in done.stderr, done.stderr
    too_large = job(tmp_path, "kibibytes", args=[1, 2048, 1], chunksize=1, response_mode="none")
    began = time.monotonic()
    done = shared.console("compute", str(too_large), env=small, timeout=60)
    took = time.monotonic() - began
    assert done.returncode == 1, shared.explain(done)
    no_traceback(done)
    (line,) = error_lines(done)
    assert "argument 1 raised ResultTooLarge: its result needs a frame of 2,097," in line, line
    assert "over the limit of 1,048,576 bytes" in line and "REMAP_MAX_FRAME" in line, line
    assert took < 30, f"{took:.1f}s"


def test_attach_from_a_console_with_smaller_frames_says_what_the_server_keeps(
    shared: Cluster, tmp_path: Path
) -> None:
    """A detached job whose result of 2 MiB the server counts as done (status: 3 done, 0
    failed). ``attach`` from a console at REMAP_MAX_FRAME=1 MiB gets the two results that fit,
    and for the third an error saying it is too large for this console and that the server
    keeps it, then one line saying the server counts it done (not "1 argument(s) failed": the
    job's counts stay the server's); exit code 1. ``attach`` at the default then gets all three:
    nothing was lost. Before, the small attach said "1 argument(s) failed (on_error:
    continue)" for a job status counted wholly done."""
    detached = job(tmp_path, "kibibytes", args=[1, 2048, 1], chunksize=1)
    began = shared.console("compute", str(detached), "--detach", "--json", timeout=60)
    job_id = json.loads(shared.assert_ok(began).stdout)["job"]

    def finished() -> dict[str, Any] | None:
        status = json.loads(shared.assert_ok(shared.console("status", "--json")).stdout)
        state = next(j for j in status["jobs"] if j["id"] == job_id)
        return state if state["state"] != "running" else None

    state = shared.wait_for(finished, 60, "the detached job to finish")
    assert (state["state"], state["done"], state["failed"]) == ("done", 3, 0), state
    small = {"REMAP_MAX_FRAME": str(1 << 20)}
    done = shared.console("attach", job_id, "--json", env=small, timeout=60)
    assert done.returncode == 1, shared.explain(done)
    no_traceback(done)
    first, kept, last = json.loads(done.stdout)
    assert first == last == funcs.kibibytes(1)
    assert kept["type"] == "ResultTooLarge", kept
    text = kept["message"]
    assert "over the limit of 1,048,576 bytes on frames to this console" in text, text
    assert "the server keeps it: attach with a larger REMAP_MAX_FRAME" in text, text
    (summary,) = error_lines(done)
    assert f"1 result(s) of job {job_id} that the server counts as done" in summary, summary
    assert "the server keeps them" in summary, summary
    assert "argument(s) failed" not in done.stderr, done.stderr
    again = shared.assert_ok(shared.console("attach", job_id, "--json", timeout=60))
    assert json.loads(again.stdout) == [funcs.kibibytes(n) for n in (1, 2048, 1)]


def kib(n: int) -> str:
    """A string of ``n`` KiB (run on the nodes, importable there by name)."""
    return "k" * (n * 1024)


def test_a_python_api_handle_with_a_small_frame_limit_gets_results_or_one_line(
    shared: Cluster,
) -> None:
    """The Python API's own limit (``Settings(max_frame=1 MiB)``, passed explicitly) reaches
    the server: a map whose batch of results is over it returns every result, a call whose
    result is 2 MiB raises one line naming the size, the limit and the setting within
    seconds, and the handle goes on (no reconnect: the connection was never dropped)."""
    settings = Settings(max_frame=1 << 20)
    with remap.connect(shared.address, secret=shared.secret, settings=settings) as c:
        assert c.map(kib, [300] * 10, chunksize=10) == [kib(300)] * 10
        began = time.monotonic()
        with pytest.raises(remap.RemapError) as info:
            c.submit(kib, 2048).result(timeout=30)
        took = time.monotonic() - began
        text = str(info.value)
        assert "ResultTooLarge" in text and "its result needs a frame of 2,097," in text, text
        assert "over the limit of 1,048,576 bytes" in text and "REMAP_MAX_FRAME" in text, text
        assert "\n" not in text.strip() and type(info.value).__name__ == "RemoteTaskError", text
        assert took < 30, f"{took:.1f}s"
        assert c.submit(kib, 1).result(timeout=30) == kib(1)
        assert c._client.reconnects == 0


def test_a_node_with_a_small_frame_limit_runs_what_fits_it_and_the_rest_fails_in_one_line(
    make_cluster: ClusterFactory,
) -> None:
    """A node whose REMAP_MAX_FRAME (1 MiB, in its own environment) is far below the server's
    (256 MiB): a map of arguments of 100 KiB runs, and a call whose argument is 2 MiB fails
    within seconds with one line naming the frame it needs, the node's limit and the setting;
    the handle goes on and the node never refused a frame. It used to loop: the node refused
    the frame, connected again, and was sent the same task again (135 times in 30 s, the job
    never ended; here: no end within the 30 s deadline)."""
    cluster = make_cluster([NodeSpec(cores=1, env={"REMAP_MAX_FRAME": str(1 << 20)})])
    with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as c:
        assert c.map(len, [b"a" * 100 * 1024] * 60, chunksize=20) == [100 * 1024] * 60
        began = time.monotonic()
        with pytest.raises(remap.RemapError) as info:
            c.submit(len, b"b" * (2 << 20)).result(timeout=30)
        took = time.monotonic() - began
        text = str(info.value)
        assert "ArgumentTooLarge" in text and "its task needs a frame of 2,097," in text, text
        assert "over the limit of 1,048,576 bytes on frames to the nodes" in text, text
        assert "raise the nodes' REMAP_MAX_FRAME" in text and "\n" not in text.strip(), text
        assert took < 30, f"{took:.1f}s"
        assert c.submit(len, b"c").result(timeout=30) == 1
    (node,) = cluster.nodes
    assert "exceeds the limit" not in node.log_text(), cluster.diagnostics()
    assert "lost" not in cluster.server.log_text(), cluster.diagnostics()


def test_many_small_arguments_run_on_a_node_with_small_frames(
    make_cluster: ClusterFactory,
) -> None:
    """A node at REMAP_MAX_FRAME=32 KiB, the server and the handle at the default: maps of
    small arguments whose argument groups (sized by the client, about 64 KiB, more where the
    arguments grow) would fit no node return every result right, from a list and from a
    generator. Before, the groups failed each of their arguments with ArgumentTooLarge though
    each fits alone (the server cannot split a group); the server now says the bound
    (``group_limit``)."""
    cluster = make_cluster([NodeSpec(cores=1, env={"REMAP_MAX_FRAME": str(32 * 1024)})])
    uniform = [bytes([i % 251]) * 3072 for i in range(3000)]
    ramp = [bytes([i % 251]) * 8 for i in range(3000)]
    ramp += [bytes([i % 251]) * 6144 for i in range(3000)]
    with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as c:
        for values in (uniform, ramp):
            assert c.map(len, values) == [len(v) for v in values]
            assert list(c.imap(len, iter(values))) == [len(v) for v in values]
    (node,) = cluster.nodes
    assert "exceeds the limit" not in node.log_text(), cluster.diagnostics()
    assert "ArgumentTooLarge" not in cluster.server.log_text(), cluster.diagnostics()


@pytest.mark.parametrize("mode", ["object", "stream"])
def test_on_error_continue_reports_each_error(shared: Cluster, tmp_path: Path, mode: str) -> None:
    """on_error: continue -> exit 5 (finished with failed arguments); each failing index
    carries its error type and message."""
    args = list(range(0, 45))
    done = compute(
        shared,
        job(tmp_path, "fail_on_3_mod_7", args=args, on_error="continue", response_mode=mode),
        "--json",
        ok=False,
    )
    assert done.returncode == 5, shared.explain(done)
    no_traceback(done)
    if mode == "object":
        values = dict(enumerate(json.loads(done.stdout)))
    else:
        items = [json.loads(line) for line in done.stdout.splitlines()]
        assert sorted(item["index"] for item in items) == list(range(len(args)))
        values = {item["index"]: item.get("error", item.get("result")) for item in items}
    assert len(values) == len(args)
    for i, x in enumerate(args):
        if x % 7 == 3:
            assert isinstance(values[i], dict), (i, values[i])
            assert (values[i]["type"], values[i]["message"]) == ("ValueError", f"{x} is 3 mod 7")
        else:
            assert values[i] == funcs.fail_on_3_mod_7(x)
    failed = sum(1 for x in args if x % 7 == 3)
    assert f"{failed} argument(s) failed" in done.stderr


@pytest.mark.parametrize(
    ("name", "line", "key"),
    [
        ("bad_unknown_key.yaml", 4, "respons_mode"),
        ("bad_type.yaml", 5, "retries"),
        ("bad_function.yaml", 2, "function"),
    ],
)
def test_bad_job_file_exits_2_naming_file_line_and_key(
    shared: Cluster, name: str, line: int, key: str
) -> None:
    """A bad job file: exit 2, one line naming the file, the line and the key; no traceback."""
    done = compute(shared, JOBS / name, ok=False)
    assert done.returncode == 2, shared.explain(done)
    no_traceback(done)
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert f"{name}:{line}" in lines[0] and key in lines[0], lines[0]


def test_wrong_secret_exits_3_with_a_clear_line(shared: Cluster) -> None:
    """A console with the wrong secret: exit 3 and one line that talks about the secret."""
    done = shared.console("status", env={"REMAP_SECRET_KEY": "not-the-secret"}, timeout=30)
    assert done.returncode == 3, shared.explain(done)
    no_traceback(done)
    lines = error_lines(done)
    assert len(lines) == 1 and "secret" in lines[0].lower(), done.stderr


def test_node_with_a_wrong_secret_stops_with_exit_3(shared: Cluster) -> None:
    """A node that cannot authenticate does not retry forever: exit 3 with one clear line."""
    done = run_process(
        [
            PYTHON,
            NODE_SCRIPT,
            "--server",
            shared.address,
            "--cores",
            "1",
            "--env-file",
            "/dev/null",
        ],
        shared.env({"REMAP_SECRET_KEY": "not-the-secret"}),
        cwd=shared.tmp,
        timeout=30,
    )
    assert done.returncode == 3, shared.explain(done)
    no_traceback(done)
    errors = [line for line in error_lines(done) if line.startswith("error:")]
    assert len(errors) == 1 and "secret" in errors[0].lower(), done.stderr
    assert len(shared.status()["nodes"]) == 2


def test_unreachable_server_fails_with_a_clear_line(shared: Cluster) -> None:
    """No server at the address: non-zero exit and one line saying it cannot be reached."""
    with _refusing_port() as port:
        done = shared.console("--server", f"127.0.0.1:{port}", "status", server=False, timeout=30)
    assert done.returncode != 0
    no_traceback(done)
    lines = error_lines(done)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "reach" in lines[0], done.stderr


# ---------------------------------------------------------------------- outputs


@contextmanager
def _refusing_port() -> Iterator[int]:
    """A port that refuses connections while the block runs: bound here, never listening.
    (A port found free and closed again could be taken by any process's listener meanwhile.)"""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_rerun_that_cannot_reach_the_server_leaves_the_outputs_alone(
    shared: Cluster, tmp_path: Path
) -> None:
    """A good run's outputs (1,000 JSON lines; a results table beside a table of the user's)
    are byte for byte the same after a rerun against an unreachable server, which exits 4
    with one line saying the output was left unchanged; nothing is left beside them."""
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"index": i, "result": i}) + "\n" for i in range(1000)))
    db = tmp_path / "out.sqlite"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE results (idx INTEGER PRIMARY KEY, result)")
        conn.executemany("INSERT INTO results VALUES (?, ?)", [(i, i) for i in range(1000)])
        conn.execute("CREATE TABLE notes (text)")
    jobs = [
        job(tmp_path, "square", args_range=[0, 10], response_mode="file", output=str(out)),
        job(tmp_path, "square", args_range=[0, 10], response_mode="sqlite", output=str(db)),
    ]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for job_file in jobs:
        with _refusing_port() as port:
            done = shared.console(
                "--server", f"127.0.0.1:{port}", "compute", str(job_file), server=False, timeout=30
            )
        assert done.returncode == 4, shared.explain(done)
        no_traceback(done)
        lines = error_lines(done)
        assert len(lines) == 1 and "reach" in lines[0] and "left unchanged" in lines[0], lines
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_second_job_writing_the_same_output_is_refused(shared: Cluster, tmp_path: Path) -> None:
    """While one console writes out.jsonl, a second job with the same output exits 1 with one
    line naming the output and the lock; Ctrl-C then stops the first, whose closing line
    says how many results it kept and where, and out.jsonl was never written by either."""
    out = tmp_path / "out.jsonl"
    # 2000 calls of 0.3 s on the cluster's 3 cores: 200 s, so the first job is still writing
    # when Ctrl-C comes however long the refused console took (200 calls lasted 20 s)
    first = job(tmp_path, "slow", args_range=[0, 2000], response_mode="file", output=str(out))
    second = job(tmp_path, "square", args_range=[0, 10], response_mode="file", output=str(out))
    computing = shared.console_popen("compute", str(first))

    def first_has_results() -> bool:
        found = [j for j in shared.status()["jobs"] if j["name"] == first.stem]
        return bool(found) and found[0]["done"] >= 3

    shared.wait_for(first_has_results, 30, "the first job to have results")
    refused = compute(shared, second, timeout=30, ok=False)
    assert refused.returncode == 1, shared.explain(refused)
    no_traceback(refused)
    lines = error_lines(refused)
    assert len(lines) == 1, refused.stderr
    assert f"{out} is being written by another job" in lines[0] and str(lock_path(out)) in lines[0]

    computing.send_signal(signal.SIGINT)
    done = shared.finish(computing, timeout=15)
    assert done.returncode == 130, shared.explain(done)
    no_traceback(done)
    kept = [line for line in error_lines(done) if "kept" in line]
    assert len(kept) == 1, done.stderr
    count = int(kept[0].split("kept ")[1].split(" ")[0])
    assert f"in {out.parent}/.{out.name}.partial; {out} not written" in kept[0], kept[0]
    lines = Path(f"{out.parent}/.{out.name}.partial").read_text().splitlines()
    assert count >= 3 and len(lines) == count
    assert [json.loads(line)["index"] for line in lines] == sorted(
        json.loads(line)["index"] for line in lines
    )
    assert not out.exists() and not lock_path(out).exists()


def test_a_bad_args_path_line_says_what_was_kept(shared: Cluster, tmp_path: Path) -> None:
    """A bad line in args_path stops the job: one line naming it and saying what was kept
    and where; the kept partial file holds exactly that many lines."""
    path = tmp_path / "args.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(3000)) + "{oops\n")
    out = tmp_path / "out.jsonl"
    job_file = job(tmp_path, "square", args_path=str(path), response_mode="file", output=str(out))
    done = compute(shared, job_file, timeout=30, ok=False)
    assert done.returncode == 2, shared.explain(done)  # the user's file is bad
    no_traceback(done)
    lines = error_lines(done)
    assert len(lines) == 1 and f"{path}:3001: invalid JSON" in lines[0], done.stderr
    assert f"{out} not written" in lines[0], lines[0]
    if "no results kept" in lines[0]:
        assert not Path(f"{out.parent}/.{out.name}.partial").exists()
    else:
        count = int(lines[0].split("kept ")[1].split(" ")[0])
        assert len(Path(f"{out.parent}/.{out.name}.partial").read_text().splitlines()) == count
    assert not out.exists()


@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_results_the_console_cannot_unpickle_are_errors(
    shared: Cluster, tmp_path: Path, on_error: str
) -> None:
    """A result that will not unpickle on the console is an error, never a success: on_error
    fail exits 1 naming the argument; continue exits 5 with each unreadable one an error."""
    args = list(range(20))
    job_file = job(tmp_path, "unreadable_on_3_mod_7", args=args, on_error=on_error, chunksize=1)
    done = compute(shared, job_file, "--json", timeout=30, ok=False)
    no_traceback(done)
    if on_error == "fail":
        assert done.returncode == 1, shared.explain(done)
        lines = error_lines(done)
        assert len(lines) == 1 and "ResultUnreadable" in lines[0], done.stderr
        assert json.loads(done.stdout)["state"] == "failed"
        return
    assert done.returncode == 5, shared.explain(done)
    values = json.loads(done.stdout)
    for x, value in zip(args, values, strict=True):
        if x % 7 == 3:
            assert value["type"] == "ResultUnreadable", value
        else:
            assert value == x
    assert "3 argument(s) failed" in done.stderr


def test_disk_full_says_which_file_and_keeps_what_was_written(
    shared: Cluster, tmp_path: Path, small_disk: Path
) -> None:
    """3 MB of results into a 1 MiB file system: exit 1 with one line saying the disk is full
    and naming the file (not "lost the connection"); the partial file keeps whole lines."""
    out = small_disk / "out.jsonl"
    job_file = job(
        tmp_path, "ten_kilobytes", args_range=[0, 300], response_mode="file", output=str(out)
    )
    done = compute(shared, job_file, timeout=30, ok=False)
    assert done.returncode == 1, shared.explain(done)
    no_traceback(done)
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert "disk full" in lines[0] and f"{out.parent}/.{out.name}.partial" in lines[0], lines[0]
    assert "connection" not in lines[0], lines[0]
    kept = Path(f"{out.parent}/.{out.name}.partial").read_text().splitlines()
    assert kept and [json.loads(line)["index"] for line in kept] == list(range(len(kept)))
    assert f"kept {len(kept)} result(s)" in lines[0], lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------- cluster commands


def test_kill_and_attach_of_an_unknown_job_exit_2_with_one_line(shared: Cluster) -> None:
    """A job id the server does not have is a mistake on the command line: exit 2 for `kill`
    as for `attach`, one line naming the id, no traceback."""
    for command in ("kill", "attach"):
        done = shared.console(command, "987654321", timeout=30)
        assert done.returncode == 2, shared.explain(done)
        no_traceback(done)
        lines = error_lines(done)
        assert len(lines) == 1 and "987654321" in lines[0], done.stderr


def test_status_shows_a_running_job_and_kill_stops_it(shared: Cluster, tmp_path: Path) -> None:
    """A job shows as running in status; `kill JOB` ends it (its console says so), kills its busy
    cores (every call sleeps 60 s) and the next job runs at once."""
    stuck = job(tmp_path, "stuck", args_range=[0, 20])
    computing = shared.console_popen("compute", str(stuck), "--json")

    def running() -> dict | None:
        status = shared.status()
        found = [j for j in status["jobs"] if j["name"] == stuck.stem]
        busy = sum(n["busy"] for n in status["nodes"])
        return found[0] if found and found[0]["state"] == "running" and busy == 3 else None

    running_job = shared.wait_for(running, 30, f"job {stuck.stem} to be running on all 3 cores")
    killed = shared.console("kill", str(running_job["id"]), timeout=30)
    shared.assert_ok(killed)
    assert "killed" in killed.stdout
    # "ends it": within 30 s (a console starting on a loaded machine takes seconds), half the
    # 60 s the calls would take if the kill did not stop them
    done = shared.finish(computing, timeout=30)
    assert done.returncode != 0, shared.explain(done)
    no_traceback(done)
    assert "killed" in done.stderr.lower(), done.stderr
    assert shared.job(running_job["id"])["state"] == "killed"
    after = compute(shared, job(tmp_path, "square", args_range=[0, 30]), "--json", timeout=30)
    assert json.loads(after.stdout) == [funcs.square(x) for x in range(30)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_computing_console_kills_its_job(
    shared: Cluster, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C (SIGINT) in `compute`, or SIGTERM (`timeout`, `kill`), as for a data job: the
    console exits 130 at once saying so and the job is killed on the server. "At once" is within
    30 s (generous on a loaded machine): the job would take 200 s. SIGTERM killed the console
    with no line (exit -15), its job cancelled only after the console's grace."""
    slow = job(tmp_path, "slow", args_range=[0, 2000])
    computing = shared.console_popen("compute", str(slow))

    def running() -> dict | None:
        found = [j for j in shared.status()["jobs"] if j["name"] == slow.stem]
        return found[0] if found and found[0]["state"] == "running" else None

    job_id = shared.wait_for(running, 30, f"job {slow.stem} to be running")["id"]
    computing.send_signal(sig)
    done = shared.finish(computing, timeout=30)
    assert done.returncode == 130, shared.explain(done)
    no_traceback(done)
    assert f"interrupted: killing job {job_id}" in done.stderr
    shared.wait_for(
        lambda: shared.job(job_id)["state"] == "killed", 30, f"job {job_id} to be killed"
    )


def test_interrupting_compute_json_still_prints_its_summary(
    shared: Cluster, tmp_path: Path
) -> None:
    """Ctrl-C in `compute --json` (a file job): stdout still ends with the one JSON summary a
    job that did not finish gets (state killed, exit_code 130, what was kept and where), as the
    README promises; it printed nothing, so a script reading stdout had no JSON to read."""
    output = tmp_path / "slow.jsonl"
    slow = job(tmp_path, "slow", args_range=[0, 2000], response_mode="file", output=str(output))
    computing = shared.console_popen("compute", str(slow), "--json")

    def running() -> dict | None:
        found = [j for j in shared.status()["jobs"] if j["name"] == slow.stem]
        return found[0] if found and found[0]["state"] == "running" else None

    job_id = shared.wait_for(running, 30, f"job {slow.stem} to be running")["id"]
    computing.send_signal(signal.SIGINT)
    done = shared.finish(computing, timeout=30)
    assert done.returncode == 130, shared.explain(done)
    no_traceback(done)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["job"], summary["state"], summary["exit_code"]) == (job_id, "killed", 130)
    assert summary["mode"] == "file" and "interrupted" in summary["error"]
    assert summary["kept"] == summary["done"]
    assert not output.exists(), "an interrupted job published its output"


def test_interrupting_a_data_job_says_what_became_of_it(shared: Cluster, tmp_path: Path) -> None:
    """Ctrl-C in `compute` of a data job: exit 130 with one line naming the job and saying
    nothing was published (it said only "interrupted"); no output directory appears."""
    (tmp_path / "slowmap.py").write_text(
        "import time\n\ndef map(line):\n    time.sleep(0.05)\n    yield line, 1\n\n"
        "def reduce(k, vs):\n    yield k, sum(vs)\n"
    )
    (tmp_path / "in.txt").write_text("".join(f"{i}\n" for i in range(2000)))
    data_job = tmp_path / "slowdata.yaml"
    data_job.write_text("kind: mapreduce\nmodule: slowmap.py\ninput: in.txt\noutput: out/\n")
    computing = shared.console_popen("compute", str(data_job))

    def mapping() -> bool:
        return any(
            j["name"].startswith("slowdata [map") and j["state"] == "running"
            for j in shared.status()["jobs"]
        )

    shared.wait_for(mapping, 30, "the data job's map phase to run")
    computing.send_signal(signal.SIGINT)
    done = shared.finish(computing, timeout=20)
    assert done.returncode == 130, shared.explain(done)
    no_traceback(done)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: data job ") and last.endswith(
        " killed; nothing was published"
    ), done.stderr
    assert not (tmp_path / "out").exists()


def test_interrupting_attach_leaves_the_job_running_and_says_so(
    shared: Cluster, tmp_path: Path
) -> None:
    """Ctrl-C in `attach`: exit 130 with one line saying the job runs on and how to attach
    again (it said only "interrupted", which reads as if the job had been stopped). The job
    lasts 400 s (4000 calls of 0.3 s on 3 cores; 400 calls lasted 40 s, less than two consoles
    and a status wait can take on a loaded machine) and is killed at the end."""
    slow = job(tmp_path, "slow", args_range=[0, 4000])
    done = compute(shared, slow, "--detach", "--json")
    job_id = json.loads(done.stdout)["job"]
    attaching = shared.console_popen("attach", str(job_id))
    shared.wait_for(lambda: shared.job(job_id)["attached"], 30, f"a console attached to {job_id}")
    attaching.send_signal(signal.SIGINT)
    ended = shared.finish(attaching, timeout=30)
    assert ended.returncode == 130, shared.explain(ended)
    no_traceback(ended)
    last = ended.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: job {job_id} runs on; attach again with: "), last
    assert last.endswith(f"attach {job_id}"), last
    assert shared.job(job_id)["state"] == "running"
    shared.assert_ok(shared.console("kill", str(job_id)))


def test_nodes_and_jobs_commands_text_and_json(shared: Cluster, tmp_path: Path) -> None:
    """`nodes` and `jobs`, as tables and as --json, show both nodes and a finished job."""
    finished = job(tmp_path, "square", args=[1, 2, 3])
    compute(shared, finished)
    nodes = json.loads(shared.assert_ok(shared.console("nodes", "--json")).stdout)
    assert sorted(n["pid"] for n in nodes) == sorted(c.pid for c in shared.nodes)
    table = shared.assert_ok(shared.console("nodes")).stdout.splitlines()
    assert table[0].split()[:2] == ["NODE", "HOST"] and len(table) == 4, (
        table
    )  # header, rule, 2 nodes
    assert sum("gpu" in row for row in table[2:]) == 1
    jobs = json.loads(shared.assert_ok(shared.console("jobs", "--json")).stdout)
    mine = [j for j in jobs if j["name"] == finished.stem]
    assert len(mine) == 1 and (mine[0]["state"], mine[0]["done"]) == ("done", 3), jobs
    text = shared.assert_ok(shared.console("jobs")).stdout
    assert text.splitlines()[0].split()[:3] == ["JOB", "NAME", "STATE"]
    assert any(finished.stem in row and "done" in row for row in text.splitlines()), text


def test_group_job_runs_only_on_the_group_node(shared: Cluster, tmp_path: Path) -> None:
    """group: gpu -> every call runs on the node started with --group gpu."""
    done = compute(
        shared, job(tmp_path, "node_name", args_range=[0, 30], group="gpu", chunksize=1), "--json"
    )
    assert json.loads(done.stdout) == ["gpu"] * 30


def test_job_without_group_may_run_anywhere(shared: Cluster, tmp_path: Path) -> None:
    """Control for the group test: a job with no group sees the nodes' markers (so they are set)."""
    done = compute(shared, job(tmp_path, "node_name", args_range=[0, 30], chunksize=1), "--json")
    assert set(json.loads(done.stdout)) <= {"plain", "gpu"} and json.loads(done.stdout)


def test_wait_for_nodes_fails_for_an_empty_group(shared: Cluster, tmp_path: Path) -> None:
    """compute --wait-for-nodes 1 on a group no node has: fails promptly, saying no node can run it."""
    done = compute(
        shared,
        job(tmp_path, "square", args=[1], group="nothere"),
        "--wait-for-nodes",
        "1",
        ok=False,
        timeout=20,
    )
    assert done.returncode != 0, shared.explain(done)
    no_traceback(done)
    text = done.stderr.lower()
    assert "no nodes" in text or "waiting for nodes" in text, done.stderr
    assert "nothere" in done.stderr


def test_user_function_stdout_is_shown_on_console_stderr(shared: Cluster) -> None:
    """What the user function prints on a core reaches the console's stderr; stdout keeps the results."""
    done = compute(shared, JOBS / "chatty.yaml", "--json")
    assert json.loads(done.stdout) == [funcs.chatty(x) for x in (1, 2, 3)]
    for x in (1, 2, 3):
        assert f"chatty says hello from argument {x}" in done.stderr, done.stderr


def test_console_with_a_different_heartbeat_setting_is_not_dropped(
    shared: Cluster, tmp_path: Path
) -> None:
    """A console whose REMAP_HEARTBEAT_INTERVAL (3 s) differs from the server's (0.5 s) still
    finishes a 3 s job: peers must agree on the beat, not trust each side's own setting."""
    job_file = job(tmp_path, "slow", args_range=[0, 30])
    done = shared.console(
        "compute", str(job_file), "--json", env={"REMAP_HEARTBEAT_INTERVAL": "3"}, timeout=60
    )
    shared.assert_ok(done)
    assert json.loads(done.stdout) == list(range(30))


# ---------------------------------------------------------------------- failures (own clusters)


def test_results_exactly_once_when_a_node_is_sigkilled(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """SIGKILL a node mid-job: its work is re-queued and every index is delivered exactly once.

    The kill lands while the node has tasks in flight and most of the job is left (200 calls of
    50 ms on 2 cores: ~5 s), so there is work to re-queue however loaded the machine is."""
    cluster = make_cluster([NodeSpec(cores=1), NodeSpec(cores=1)])
    args = list(range(200))
    job_file = job(tmp_path, "nap", args=args, response_mode="stream", chunksize=1)
    computing = cluster.console_popen("compute", str(job_file), "--json")
    victim = cluster.nodes[0].pid
    # status over a connection made beforehand answers in milliseconds: a status console's
    # start (2 s at load 4, more when busier) let the job run ~20 calls a second meanwhile
    with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as watcher:

        def started() -> bool:
            status = watcher.status()
            found = [j for j in status["jobs"] if j["name"] == job_file.stem]
            busy = [n for n in status["nodes"] if n["pid"] == victim and n["tasks_in_flight"] > 0]
            return bool(found) and found[0]["done"] >= 5 and bool(busy)

        cluster.wait_for(started, 30, "the job to be under way on both nodes")
        cluster.kill_node(0, signal.SIGKILL)
        left = [j for j in watcher.status()["jobs"] if j["name"] == job_file.stem][0]
    assert left["done"] < len(args) - 20, "the job was nearly over when its node was killed"
    done = cluster.finish(computing, timeout=60)
    cluster.assert_ok(done)
    items = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(item["index"] for item in items) == list(range(len(args)))
    assert {item["index"]: item["result"] for item in items} == {
        i: funcs.square(x) for i, x in enumerate(args)
    }  # nap = square, slowly


def test_drain_by_the_id_shown_in_nodes(make_cluster: ClusterFactory, tmp_path: Path) -> None:
    """`drain ID` with the id `nodes` shows: that node is draining and new work goes elsewhere."""
    cluster = make_cluster(
        [
            NodeSpec(cores=1, env={"TEST_NODE_NAME": "a"}),
            NodeSpec(cores=1, env={"TEST_NODE_NAME": "b"}),
        ]
    )
    status = cluster.status()
    full_id = next(n["id"] for n in status["nodes"] if n["pid"] == cluster.nodes[0].pid)
    shown = next(
        row.split()[0]
        for row in cluster.console("nodes").stdout.splitlines()[2:]
        if full_id.startswith(row.split()[0])
    )
    cluster.assert_ok(cluster.console("drain", shown))
    assert next(n for n in cluster.status()["nodes"] if n["id"] == full_id)["draining"] is True
    done = compute(cluster, job(tmp_path, "node_name", args_range=[0, 20], chunksize=1), "--json")
    assert json.loads(done.stdout) == ["b"] * 20


def test_nodes_reconnect_after_a_server_restart(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """Server restart: the nodes reconnect by themselves and the next job runs on them."""
    cluster = make_cluster([NodeSpec(cores=1), NodeSpec(cores=1)])
    cluster.restart_server(signal.SIGKILL)
    status = cluster.status()
    assert sorted(n["pid"] for n in status["nodes"]) == sorted(c.pid for c in cluster.nodes)
    done = compute(cluster, job(tmp_path, "square", args_range=[0, 40]), "--json")
    assert json.loads(done.stdout) == [funcs.square(x) for x in range(40)]
