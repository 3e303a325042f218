"""The console as a user meets it: the embedded cluster, help, usage errors, the shell, kill --cluster.

Commands run as real processes (``remap_console.py``) with a clean environment; the interactive
``Shell`` is driven through ``onecmd`` with a ``Console`` writing to StringIO.
"""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from protocol.options import JobOptions
from remap.client import JobOutcome, JobStream
from remap.console.main import COMMANDS, Console, Shell, UsageError, build_parser
from remap.console.session import Session
from remap.errors import JobFailed
from remap.settings import ENV_DOC, load_settings
from tests.cluster_harness import (
    CONSOLE_SCRIPT,
    JOBS,
    NODE_SCRIPT,
    ROOT,
    SERVER_SCRIPT,
    Cluster,
    alarming_lines,
    jobs_function,
    load_module,
    run_entry,
    write_job,
)

funcs = load_module(JOBS / "funcs.py")


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def console(tmp_path: Path, *args: object, timeout: float = 120.0):
    """The console with no server configured (no REMAP_SERVER, no .env), in ``tmp_path``."""
    return run_entry(
        CONSOLE_SCRIPT,
        "--env-file",
        "/dev/null",
        *args,
        home=tmp_path,
        cwd=tmp_path,
        timeout=timeout,
    )


# ---------------------------------------------------------------------- embedded cluster


@pytest.mark.slow
def test_default_job_runs_on_an_embedded_cluster(tmp_path: Path) -> None:
    """No server configured: compute remap_config.yaml says so in one line and prints 849666."""
    done = console(tmp_path, "compute", ROOT / "remap_config.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "849666"  # sum of Collatz steps for 1..10000
    notes = lines_of(done.stderr)
    assert len(notes) == 1 and "embedded" in notes[0], done.stderr


@pytest.mark.slow
def test_embedded_cluster_runs_a_job_file(tmp_path: Path) -> None:
    """The embedded cluster (two cores) gives a job's exact results in argument order."""
    job = write_job(
        tmp_path / "squares.yaml",
        {"function": jobs_function("funcs", "square"), "args_range": [0, 300, 3]},
    )
    done = console(tmp_path, "--cores", "2", "compute", job, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [funcs.square(x) for x in range(0, 300, 3)]
    notes = lines_of(done.stderr)
    assert len(notes) == 1 and "embedded local cluster with 2 cores" in notes[0], done.stderr


@pytest.mark.slow
def test_stream_json_flags_the_values_written_as_their_repr(tmp_path: Path) -> None:
    """``compute --json`` of a stream job writes the file mode's lines: a value JSON cannot
    hold is its repr() flagged ``"repr": true`` (as the README says), so a result that is the
    string "b'ab'" is told apart from the bytes b'ab'; the flag was missing on stdout."""
    (tmp_path / "values.py").write_text(
        "def value(x):\n    return [b'ab', \"b'ab'\", {1, 2}, {'k': 1}][x]\n"
    )
    job = write_job(
        tmp_path / "values.yaml",
        {"function": "values.py:value", "args_range": [0, 4], "response_mode": "stream"},
    )
    done = console(tmp_path, "--cores", "1", "compute", job, "--json")
    assert done.returncode == 0, done.stderr
    lines = sorted((json.loads(line) for line in lines_of(done.stdout)), key=lambda d: d["index"])
    assert lines == [
        {"index": 0, "result": "b'ab'", "repr": True},
        {"index": 1, "result": "b'ab'"},
        {"index": 2, "result": "{1, 2}", "repr": True},
        {"index": 3, "result": {"k": 1}},
    ]


@pytest.mark.slow
def test_cluster_commands_without_a_server_say_how_to_configure_one(tmp_path: Path) -> None:
    """status with no server configured: exit 2 and one line naming --server / REMAP_SERVER."""
    done = console(tmp_path, "status", timeout=30)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    notes = lines_of(done.stderr)
    assert len(notes) == 1 and "--server" in notes[0] and "REMAP_SERVER" in notes[0], done.stderr


@pytest.mark.slow
def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """``remap help | head -1``: the pipe's reader is gone before the console writes; it
    exits 141 (as a writer killed by SIGPIPE) with nothing on stderr, not a traceback."""
    import subprocess

    from tests.cluster_harness import PYTHON, clean_env

    child = subprocess.Popen(
        [PYTHON, str(CONSOLE_SCRIPT), "--env-file", "/dev/null", "help"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    child.stdout.close()  # before the console printed anything: its write meets a closed pipe
    _, err = child.communicate(timeout=60)
    assert (child.returncode, err.decode()) == (141, "")


@pytest.mark.slow
def test_a_reader_that_leaves_a_stream_job_early_gets_141_and_no_error_line(
    tmp_path: Path,
) -> None:
    """``remap compute stream.yaml | head -1``: results written mid-job meet the closed pipe;
    the console leaves with 141 and no line, as ``status | head`` does and ``--json`` did (it
    said "error: could not write results to standard output: Broken pipe" and exited 1)."""
    import subprocess

    from tests.cluster_harness import PYTHON, clean_env

    job = write_job(
        tmp_path / "squares.yaml",
        {
            "function": jobs_function("funcs", "square"),
            "args_range": [0, 5000],
            "response_mode": "stream",
        },
    )
    child = subprocess.Popen(
        [PYTHON, str(CONSOLE_SCRIPT), "--env-file", "/dev/null", "--cores", "1", "compute", job],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    child.stdout.close()  # the reader is gone before the first result line
    _, err = child.communicate(timeout=120)
    assert child.returncode == 141, err.decode()
    assert [line for line in lines_of(err.decode()) if "embedded" not in line] == []


@pytest.mark.parametrize("name", ["drain", "undrain", "exclude", "include"])
def test_node_commands_help_names_every_way_to_name_a_node(name: str) -> None:
    """``drain --help`` and friends say NODE may be an id or prefix, host:pid or a node name,
    as the server takes it and the README says (it said "the node id, or a unique prefix":
    `exclude` of a host not connected is its main use)."""
    parser = build_parser()
    sub = next(
        a
        for a in parser._subparsers._group_actions
        if a.dest == "command"  # type: ignore[union-attr]
    ).choices[name]
    text = " ".join(sub.format_help().split())
    assert "host:pid" in text and "node name" in text and "unique prefix" in text


# ---------------------------------------------------------------------- help and usage


#: per entry point: some settings its --help must list, and some it must not (another's)
HELP_SETTINGS = {
    "remap-server": (
        ["REMAP_SECRET_KEY", "REMAP_TLS_CERT", "REMAP_HANDSHAKE_TIMEOUT", "REMAP_JOURNAL"],
        ["REMAP_CORES", "REMAP_CORE_START_TIMEOUT", "REMAP_SERVER", "REMAP_TASK_OUTPUT"],
    ),
    "remap-node": (
        ["REMAP_SECRET_KEY", "REMAP_TLS_CA", "REMAP_CORE_START_TIMEOUT", "REMAP_NODE_NAME"],
        ["REMAP_JOURNAL", "REMAP_HTTP_PORT", "REMAP_USER", "REMAP_TASK_OUTPUT"],
    ),
    "remap": (
        ["REMAP_SERVER", "REMAP_SECRET_KEY", "REMAP_TLS_KEY", "REMAP_USER", "REMAP_TASK_OUTPUT"],
        ["REMAP_JOURNAL", "REMAP_MAX_HANDSHAKING", "REMAP_NODE_NAME"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "prog", "flags"),
    [
        (SERVER_SCRIPT, "remap-server", ["--host", "--port", "--port-file", "--env-file"]),
        (NODE_SCRIPT, "remap-node", ["--server", "--cores", "--group", "--env-file"]),
        (CONSOLE_SCRIPT, "remap", ["--server", "--env-file", "compute", "status", "kill"]),
    ],
)
def test_help_of_each_entry_point(tmp_path: Path, script: str, prog: str, flags: list[str]) -> None:
    """--help of server, node and console exits 0, documents their flags and ends with the
    REMAP_* settings that configure that program, each with its default and meaning, from
    remap/settings.py's table (the same text .env.example has)."""
    done = run_entry(script, "--help", home=tmp_path, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog}"), done.stdout
    for flag in flags:
        assert flag in done.stdout, f"{flag} missing from:\n{done.stdout}"
    settings = done.stdout.partition("\nsettings (environment or .env; a flag wins)")[2]
    listed = dict(re.findall(r"^  (REMAP_\w+)=(.*)$", settings, re.M))
    shown, hidden = HELP_SETTINGS[prog]
    assert set(shown) <= set(listed) and not set(hidden) & set(listed), settings
    documented = {variable: (default, comment) for variable, default, comment in ENV_DOC}
    assert all(listed[v] == documented[v][0] for v in listed), settings
    last = [v for v in documented if v in listed][-1]  # the block is the end of the help
    meaning = done.stdout.rsplit(f"  {last}={listed[last]}\n", 1)[1]
    assert " ".join(meaning.split()) == documented[last][1]


@pytest.mark.slow
@pytest.mark.parametrize("script", [SERVER_SCRIPT, NODE_SCRIPT, CONSOLE_SCRIPT])
def test_ctrl_c_while_an_entry_point_imports_is_one_line(tmp_path: Path, script: Path) -> None:
    """A Ctrl-C before the program runs (its imports take a second or more on a loaded machine,
    when users press it) ends with one line and exit code 130, not a Python traceback. The
    interrupt is made certain: a ``twisted`` first on the path raises it as it is imported."""
    fake = tmp_path / "fake"
    (fake / "twisted").mkdir(parents=True)
    (fake / "twisted" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    done = run_entry(
        script, "--version", home=tmp_path, env={"PYTHONPATH": f"{fake}:{ROOT}"}, timeout=30
    )
    assert (done.returncode, done.stderr) == (130, "interrupted\n"), done.stderr


@pytest.mark.slow
def test_help_command_lists_every_command(tmp_path: Path) -> None:
    """`remap help` needs no server and lists every command (or names it as an alias)."""
    done = console(tmp_path, "help", timeout=30)
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:  # each at the start of a line, or named as an alias
        listed = f"\n  {command} " in "\n" + done.stdout or f"alias: {command}" in done.stdout
        assert listed, f"{command} missing from:\n{done.stdout}"


@pytest.mark.slow
def test_unknown_command_exits_2_without_traceback(tmp_path: Path) -> None:
    """An unknown command: exit 2 and one error line that names it."""
    done = console(tmp_path, "frobnicate", timeout=30)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    notes = lines_of(done.stderr)
    assert len(notes) == 1 and notes[0].startswith("error:") and "frobnicate" in notes[0], (
        done.stderr
    )


def test_detach_with_wait_for_nodes_of_a_data_job_is_refused(tmp_path: Path) -> None:
    """``compute DATA_JOB --detach --wait-for-nodes S``: exit 2 with one line, before any
    server is dialled. Before, the detached driver never heard of the bound and the job waited
    for its nodes for ever, though the command line asked otherwise."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a\n")
    (tmp_path / "wc.py").write_text(
        "def map(line):\n    yield line, 1\n\n\ndef reduce(key, values):\n    yield key, 1\n"
    )
    (tmp_path / "j.yaml").write_text("kind: mapreduce\nmodule: wc.py\ninput: in/\noutput: out/\n")
    done = console(tmp_path, "compute", "j.yaml", "--detach", "--wait-for-nodes", "1", timeout=30)
    assert done.returncode == 2, done.stderr
    notes = lines_of(done.stderr)
    assert len(notes) == 1 and "--wait-for-nodes bounds an attached data" in notes[0], notes


# ---------------------------------------------------------------------- the interactive shell


@pytest.mark.slow
def test_shell_runs_commands_and_survives_mistakes(tmp_path: Path) -> None:
    """Shell.onecmd: help prints the commands; errors become one line and the shell goes on; quit ends it."""
    out, err = io.StringIO(), io.StringIO()
    session = Session(load_settings({}, environ={}, dotenv_path=None))
    shell = Shell(Console(session, out=out, err=err), build_parser())
    assert shell.onecmd("help") is False
    assert "compute JOB.yaml" in out.getvalue() and "kill JOB_ID" in out.getvalue()
    assert shell.onecmd("frobnicate now") is False
    assert shell.onecmd("status") is False  # no server configured
    assert shell.onecmd("kill") is False  # neither a job nor --cluster
    assert shell.onecmd('compute "unclosed') is False
    errors = lines_of(err.getvalue())
    assert len(errors) == 4, errors
    assert all(line.startswith("error:") for line in errors), errors
    assert (
        "frobnicate" in errors[0] and "no server configured" in errors[1] and "JOB_ID" in errors[2]
    )
    # an unknown command is named as `help frobnicate` names it: no argparse wording, and
    # not `shell` among the commands to choose from (it offered that, inside the shell)
    assert errors[0] == f"error: no command 'frobnicate' (commands: {', '.join(COMMANDS)})"
    assert "shell" not in COMMANDS
    assert shell.onecmd("") is False
    assert shell.onecmd("quit") is True
    assert shell.onecmd("EOF") is True


def test_a_mistyped_command_is_answered_with_the_nearest_one() -> None:
    """``remap stauts`` and ``stauts`` in the shell say "did you mean 'status'?", as a job
    file's mistyped key does; the command line gave argparse's list of choices (with
    ``shell``) and the shell the whole list."""
    with pytest.raises(UsageError) as typed:
        build_parser().parse_args(["--server", "h:1", "stauts", "--json"])
    assert str(typed.value) == "no command 'stauts'; did you mean 'status'?"
    out, err = io.StringIO(), io.StringIO()
    session = Session(load_settings({}, environ={}, dotenv_path=None))
    shell = Shell(Console(session, out=out, err=err), build_parser())
    assert shell.onecmd("kil 5") is False
    assert err.getvalue() == "error: no command 'kil'; did you mean 'kill'?\n"


@pytest.mark.parametrize("given", ["-1", "nan", "inf", "soon"])
def test_a_bad_wait_for_nodes_is_a_usage_error_naming_the_flag(given: str) -> None:
    """``compute --wait-for-nodes -1`` is refused as the command line is read, naming the
    flag; it was refused only after an embedded cluster had started, as 'wait_for_nodes'."""
    with pytest.raises(UsageError) as typed:
        build_parser().parse_args(["compute", "job.yaml", "--wait-for-nodes", given])
    assert str(typed.value) == (
        "remap compute: argument --wait-for-nodes: "
        f"expected a number of seconds >= 0, got {given!r}"
    )
    args = build_parser().parse_args(["compute", "job.yaml", "--wait-for-nodes", "2.5"])
    assert args.wait_for_nodes == 2.5


def test_a_job_without_arguments_prints_no_empty_line() -> None:
    """An object-mode job with no arguments (``args: []``, ``args_range: [10, 0]``) prints
    nothing on stdout and says so on stderr; it printed one empty line, read as one result.
    ``--json`` still prints its empty array."""
    session = Session(load_settings({}, environ={}, dotenv_path=None))
    for as_json, stdout in ((False, ""), (True, "[]\n")):
        out, err = io.StringIO(), io.StringIO()
        Console(session, out=out, err=err)._print_values([], as_json)
        assert out.getvalue() == stdout
        assert err.getvalue() == ("" if as_json else "no results: the job had no arguments\n")


def test_attach_off_a_terminal_prints_a_detached_data_jobs_progress_now_and_then() -> None:
    """``attach`` to a detached data job with stderr not a terminal (a log, CI) prints its
    progress line every 5 s when it changed, as ``compute`` of the job does; it printed nothing
    until the job ended, however long it ran."""
    from remap.console.detached import attach_detached
    from remap.errors import JobKilled

    lines = ["map 1/4 tasks", "map 1/4 tasks", "map 2/4 tasks", "map 3/4 tasks", "reduce 0/2"]
    answers = iter(
        [{"state": "running", "waiting": line, "done": 1, "total": 4} for line in lines]
        + [{"state": "killed", "message": "killed on request", "done": 1, "total": 4}]
    )
    now = [0.0]

    def watch(op: str, job_id: int, since: int) -> dict:
        assert (op, job_id) == ("watch", 7)
        return {"id": 7, "kind": "mapreduce", "task_output_from": 0, "task_output_end": 0,
                **next(answers)}  # fmt: skip

    def sleep(seconds: float) -> None:
        now[0] += 2.5  # a poll every 2.5 s of the job's life

    notes: list[str] = []
    session = SimpleNamespace(settings=SimpleNamespace(task_output=True), request=watch)
    console = SimpleNamespace(session=session, err=io.StringIO(), note=notes.append)
    args = SimpleNamespace(json=False, quiet=False, no_task_output=False)
    with pytest.raises(JobKilled):
        attach_detached(
            console, {"id": 7, "kind": "mapreduce"}, args, clock=lambda: now[0], sleep=sleep
        )
    assert notes == ["job 7: map 2/4 tasks", "job 7: reduce 0/2"]


def test_a_file_jobs_closing_line_agrees_in_number() -> None:
    """``1 result, 1 error written to OUT`` (it said "1 results, 1 errors")."""
    session = Session(load_settings({}, environ={}, dotenv_path=None))
    said = []
    for done, failed in ((1, 1), (9, 2), (0, 0)):
        out = io.StringIO()
        summary = {"done": done, "failed": failed, "output": "o"}
        sink = SimpleNamespace(summary=summary.copy)
        Console(session, out=out, err=io.StringIO())._print_results("file", sink, None, False)
        said.append(out.getvalue())
    assert said == [
        "1 result, 1 error written to o\n",
        "9 results, 2 errors written to o\n",
        "0 results written to o\n",
    ]


def test_a_sigterm_during_a_shell_command_ends_the_shell_too() -> None:
    """A SIGTERM while the shell runs ``compute`` ends the job as Ctrl-C does, then the shell
    (``kill PID`` of a shell means the shell); a Ctrl-C only ends the command."""
    import os
    import signal

    from remap.console.filejob import TERMINATED, terminate_as_interrupt

    def computing(signum: int) -> None:
        with terminate_as_interrupt():  # as compute runs a job
            os.kill(os.getpid(), signum)
            threading.Event().wait(10)  # the handler raises here, at once

    session = Session(load_settings({}, environ={}, dotenv_path=None))
    console = Console(session, out=io.StringIO(), err=io.StringIO())
    shell = Shell(console, build_parser())
    try:
        console.execute = lambda args: computing(signal.SIGINT)
        assert shell.onecmd("status") is False  # Ctrl-C: the shell stays
        console.execute = lambda args: computing(signal.SIGTERM)
        assert shell.onecmd("status") is True  # SIGTERM: the shell leaves
        assert console.err.getvalue() == "interrupted\ninterrupted\n"
    finally:
        TERMINATED.clear()


def test_ctrl_c_at_the_shell_prompt_gives_a_fresh_prompt() -> None:
    """Ctrl-C while the shell waits for a line drops it and prompts again, as bash or the
    Python REPL do; the shell (and an embedded cluster it started) stays. It ended the
    shell with exit code 130."""

    class Keys:
        """A terminal where the user presses Ctrl-C, then types help, then quit."""

        def __init__(self) -> None:
            self.lines: list[str | None] = [None, "help\n", "quit\n"]

        def readline(self) -> str:
            line = self.lines.pop(0)
            if line is None:
                raise KeyboardInterrupt
            return line

    out, err = io.StringIO(), io.StringIO()
    session = Session(load_settings({}, environ={}, dotenv_path=None))
    shell = Shell(Console(session, out=out, err=err), build_parser())
    shell.use_rawinput = False
    shell.stdin = Keys()  # type: ignore[assignment]
    try:
        shell.cmdloop()  # returns: quit left it, the Ctrl-C did not
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C at the prompt ended the shell")
    assert "^C" in out.getvalue() and "compute JOB.yaml" in out.getvalue()
    assert err.getvalue() == "" and shell.intro == "", "the greeting is not said again"


@pytest.mark.slow
def test_shell_status_against_a_real_cluster(cluster: Cluster) -> None:
    """Shell.onecmd('status') and ('nodes') against real processes show the two nodes."""
    done = cluster.run_script(
        JOBS / "shell_driver.py", cluster.address, "status", "nodes", "jobs", "quit", timeout=60
    )
    assert done.returncode == 0, cluster.explain(done)
    said = json.loads(done.stdout)
    assert said["stops"] == [False, False, False, True]
    assert said["err"] == "", said["err"]
    assert said["out"].startswith("2 nodes, 0/2 cores busy"), said["out"]
    assert "no jobs" in said["out"]
    for child in cluster.nodes:
        assert str(child.pid) not in said["out"]  # tables show node ids, not pids
    assert said["out"].count("NODE  ") == 2  # one table from status, one from nodes


# ---------------------------------------------------------------------- kill --cluster


@pytest.mark.slow
def test_kill_cluster_yes_stops_server_and_nodes(cluster: Cluster) -> None:
    """kill --cluster --yes: the server and every node exit by themselves within a deadline,
    calmly: the nodes say they were asked to stop (not that they lost the server and are
    reconnecting), the server that they left as told (not that it lost them)."""
    done = cluster.console("kill", "--cluster", "--yes", timeout=30)
    assert done.returncode == 0, cluster.explain(done)
    assert "2 node(s)" in done.stdout
    children = [cluster.server, *cluster.nodes]
    cluster.wait_for(
        lambda: not any(c.alive() for c in children), 15, "the server and nodes to exit"
    )
    codes = {c.name: c.exit_code() for c in children}
    assert set(codes.values()) == {0}, codes
    assert cluster.server.log_text().count("left as told") == 2, cluster.diagnostics()
    for child in children:
        assert not alarming_lines(child.log_text()), cluster.diagnostics()
    for node in cluster.nodes:
        assert "server asked this node to stop" in node.log_text(), cluster.diagnostics()


@pytest.mark.slow
def test_kill_cluster_without_yes_refuses_without_a_tty(cluster: Cluster) -> None:
    """kill --cluster with no --yes and no terminal: refused with a message; the cluster stays up."""
    done = cluster.console("kill", "--cluster", timeout=30)
    assert done.returncode == 2, cluster.explain(done)
    assert "Traceback" not in done.stderr
    notes = lines_of(done.stderr)
    assert len(notes) == 1 and "--yes" in notes[0], done.stderr
    assert cluster.server.alive() and all(c.alive() for c in cluster.nodes)
    assert len(cluster.status()["nodes"]) == 2


@pytest.mark.slow
def test_a_failed_job_names_the_argument_and_traceback_shows_the_users_code(tmp_path: Path) -> None:
    """on_error fail: one line naming the argument and exception, with a hint; with --traceback
    the remote traceback of that call is printed, starting in the user's file."""
    (tmp_path / "bad.py").write_text(
        "def f(x):\n    if x == 7:\n        raise ValueError(f'seven is bad ({x})')\n    return x\n"
    )
    job = write_job(tmp_path / "bad.yaml", {"function": "bad.py:f", "args_range": [0, 20]})
    plain = console(tmp_path, "compute", job)
    assert plain.returncode == 1, plain.stderr
    errors = [line for line in lines_of(plain.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and "argument 7 raised ValueError: seven is bad (7)" in errors[0]
    assert "--traceback" in errors[0] and "Traceback" not in plain.stderr
    shown = console(tmp_path, "compute", job, "--traceback")
    assert shown.returncode == 1, shown.stderr
    assert "remote traceback of argument 7" in shown.stderr
    assert 'bad.py", line 3, in f' in shown.stderr
    assert "remap/node/core.py" not in shown.stderr, (
        "the core's own frame is not the user's business"
    )


# ---------------------------------------------------------------------- stream mode on a terminal


class _Screen:
    """One terminal that a console's stdout and stderr both write to, rendered as lines.

    ``\\r`` returns to the line's start, ``ESC[K`` erases to its end, ``\\n`` starts a new
    line; other text overwrites what is under the cursor, as on a real terminal.
    """

    def __init__(self) -> None:
        self.lines = [""]
        self.col = 0
        self.lock = threading.Lock()

    def put(self, text: str) -> None:
        with self.lock:
            text = text.replace("\x1b[K", "\0")
            for ch in text:
                row = self.lines[-1]
                if ch == "\r":
                    self.col = 0
                elif ch == "\n":
                    self.lines.append("")
                    self.col = 0
                elif ch == "\0":
                    self.lines[-1] = row[: self.col]
                else:
                    self.lines[-1] = row[: self.col] + ch + row[self.col + 1 :]
                    self.col += 1


class _Tty(io.StringIO):
    """A terminal stream: stdout is buffered until flush (as Python's is), stderr is not."""

    def __init__(self, screen: _Screen, buffered: bool, on_write: Any = None) -> None:
        super().__init__()
        self.screen, self.buffered, self.on_write = screen, buffered, on_write
        self.pending = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.buffered:
            self.pending += text
        else:
            self.screen.put(text)
            if self.on_write is not None:
                self.on_write(text)
        return len(text)

    def flush(self) -> None:
        text, self.pending = self.pending, ""
        if text:
            self.screen.put(text)


class _StreamingSession:
    """A stream job whose results arrive from another thread, one after each progress redraw."""

    def __init__(self, results: int, drawn: threading.Event) -> None:
        self.settings = SimpleNamespace(server=None, task_output=False)
        self.results = results
        self.drawn = drawn

    def start_job(self, spec: Any, **_: Any) -> JobStream:
        stream = JobStream(b"", JobOptions(), call_soon=lambda fn, *a: None)
        stream.session.total_hint = self.results

        def feed() -> None:
            for i in range(self.results):
                if not self.drawn.wait(10):
                    stream.error = JobFailed("the progress bar was never drawn")
                    stream.events.put(("end", stream, stream.error))
                    return
                self.drawn.clear()
                stream.session.done += 1
                stream.events.put(("items", stream, [(i, i * i, None)], None))
            stream.outcome = JobOutcome(1, "done", self.results, 0, "")
            stream.events.put(("end", stream, None))

        threading.Thread(target=feed, daemon=True).start()
        return stream


def test_stream_mode_on_a_terminal_keeps_progress_out_of_the_result_lines(tmp_path: Path) -> None:
    """Stream mode with stdout and stderr on one terminal: the progress bar (stderr) is
    cleared before each result line, so every line on screen is exactly one result and the
    bar is gone at the end."""
    job = write_job(
        tmp_path / "stream.yaml",
        {
            "function": jobs_function("funcs", "square"),
            "args_range": [0, 4],
            "response_mode": "stream",
        },
    )
    screen = _Screen()
    drawn = threading.Event()
    out = _Tty(screen, buffered=True)
    err = _Tty(screen, buffered=False, on_write=lambda text: "/s" in text and drawn.set())
    console = Console(_StreamingSession(4, drawn), out=out, err=err)  # type: ignore[arg-type]
    assert console.execute(build_parser().parse_args(["compute", str(job)])) == 0
    out.flush()
    assert screen.lines == ["0: 0", "1: 1", "2: 4", "3: 9", ""], screen.lines


def test_help_documents_the_exit_codes() -> None:
    """`remap --help` and `remap help compute` list the exit codes, 5 for failed arguments."""
    parser = build_parser()
    compute_help = Console(None, parser=parser).help_text("compute")  # type: ignore[arg-type]
    for text in (parser.format_help(), compute_help):
        assert "exit codes:" in text
        assert "5    the job finished but some arguments failed (on_error: continue)" in text


def test_kill_of_a_job_and_the_cluster_at_once_is_refused() -> None:
    """``kill 5 --cluster --yes``: one line saying to choose, before any server is asked (it
    ignored the job id and stopped the whole cluster)."""
    out, err = io.StringIO(), io.StringIO()
    session = Session(load_settings({}, environ={}, dotenv_path=None))
    shell = Shell(Console(session, out=out, err=err), build_parser())
    assert shell.onecmd("kill 5 --cluster --yes") is False
    assert lines_of(err.getvalue()) == ["error: kill: give JOB_ID (5) or --cluster, not both"]
    assert out.getvalue() == ""
