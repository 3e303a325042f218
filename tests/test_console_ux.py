"""What a new user's first hour with the console hits (issue 9, item 13 and "small things").

Settings files found where a user keeps them, errors that say where they looked, hints that
work when pasted, --version, per-command help, flags after the command, tab completion of
ids, status in a fresh shell, undrain.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

import remap
from remap.console.main import Console, Shell, build_parser
from tests.cluster_harness import (
    CONSOLE_SCRIPT,
    PYTHON,
    Cluster,
    NodeSpec,
    clean_env,
    jobs_function,
    run_entry,
    run_process,
    write_job,
)


def console(tmp_path: Path, *args: Any, env: dict[str, str] | None = None, **kw: Any):
    """The console in ``tmp_path`` with HOME there too, and no settings of the developer's."""
    return run_entry(CONSOLE_SCRIPT, *args, home=tmp_path, cwd=tmp_path, env=env, **kw)


# ---------------------------------------------------------------------- version and help


def test_version_flag_and_attribute(tmp_path: Path) -> None:
    """`remap --version` and `remap.__version__` give the installed package's version."""
    version = importlib.metadata.version("remap")
    assert remap.__version__ == version
    done = console(tmp_path, "--version", timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, f"remap {version}")


def test_each_command_help_has_a_description(tmp_path: Path) -> None:
    """`remap status --help` says what status does, and lists the global options too."""
    done = console(tmp_path, "status", "--help", timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Nodes, cores busy/total" in done.stdout and "--server" in done.stdout


def test_help_command_shows_one_commands_help() -> None:
    """`help compute` (one-shot or in the shell) shows compute's options, not the list."""
    out = io.StringIO()
    parser = build_parser()
    shell = Shell(Console(StubSession(), out=out, err=io.StringIO(), parser=parser), parser)
    shell.onecmd("help compute")
    assert "usage: remap compute" in out.getvalue() and "--no-task-output" in out.getvalue()
    out.truncate(0)
    shell.onecmd("compute --help")  # argparse prints and exits; the shell goes on
    args = parser.parse_args(["help", "undrain"])
    Console(StubSession(), out=out, parser=parser).execute(args)
    assert "usage: remap undrain" in out.getvalue()


def test_global_flags_are_accepted_after_the_command() -> None:
    """`remap status --server H:P` works as `remap --server H:P status`; a flag before the
    command is kept when none follows it."""
    parser = build_parser()
    assert parser.parse_args(["status", "--server", "h:1"]).server == "h:1"
    assert parser.parse_args(["--server", "a:1", "status"]).server == "a:1"
    after = parser.parse_args(["--server", "a:1", "compute", "j.yaml", "--env-file", "x", "--json"])
    assert (after.server, after.env_file, after.json) == ("a:1", "x", True)


def test_a_flag_after_the_command_reaches_the_server(tmp_path: Path) -> None:
    """End to end: the --server given after `status` is the one dialled."""
    env = {"REMAP_SECRET_KEY": "s"}
    done = console(tmp_path, "status", "--server", "127.0.0.1:9", env=env, timeout=30)
    assert done.returncode == 4 and "127.0.0.1:9" in done.stderr, done.stderr


def test_unknown_remap_variable_in_the_environment_only_warns(tmp_path: Path) -> None:
    """Another tool's REMAP_FOO warns and the command goes on (here to its own error)."""
    done = console(tmp_path, "status", env={"REMAP_FOO": "1"}, timeout=30)
    assert "warning: REMAP_FOO from environment: unknown setting" in done.stderr, done.stderr
    assert "no server configured" in done.stderr and done.returncode == 2


# ---------------------------------------------------------------------- .env and the secret


def test_no_secret_error_says_where_it_looked(tmp_path: Path) -> None:
    """With a server but no secret anywhere, the error names every .env it looked for, in order."""
    job_dir = tmp_path / "project"
    job_dir.mkdir()
    job = write_job(job_dir / "job.yaml", {"function": "math:sqrt", "args": [1]})
    done = console(tmp_path, "--server", "127.0.0.1:9", "compute", job, timeout=60)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no secret configured"), line
    where = line[line.index("looked for .env in order:") :]
    assert where == (
        f"looked for .env in order: {tmp_path}/.env (missing), {job_dir}/.env (missing), "
        f"{tmp_path}/.remap/.env (missing)"
    )


@pytest.mark.slow
def test_a_nodes_no_secret_error_says_where_it_looked_too(tmp_path: Path) -> None:
    """remap-node with a server but no secret anywhere names every .env it looked for, as the
    console does (the README: the error "lists every place it looked"); it named only the
    server's secret file. ``--env-file /dev/null`` was read, not missing."""
    from tests.cluster_harness import NODE_SCRIPT

    done = run_entry(NODE_SCRIPT, "--server", "127.0.0.1:9", home=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no secret configured"), done.stderr
    assert line.endswith(
        f"; looked for .env in order: {tmp_path}/.env (missing), {tmp_path}/.remap/.env (missing)"
    ), line
    done = run_entry(
        NODE_SCRIPT, "--server", "127.0.0.1:9", "--env-file", "/dev/null", home=tmp_path
    )
    line = done.stderr.strip().splitlines()[-1]
    assert line.endswith("; looked for .env in order: /dev/null (read, no REMAP_SECRET_KEY)"), line


@pytest.mark.slow
def test_a_secret_next_to_the_job_file_is_found(make_cluster: Any, tmp_path: Path) -> None:
    """Run from another directory, compute finds the secret in the job's directory's .env.
    Before, only ./.env was read: "no secret configured"."""
    cluster: Cluster = make_cluster([NodeSpec(cores=1)])
    project = tmp_path / "project"
    project.mkdir()
    (project / ".env").write_text(f"REMAP_SECRET_KEY={cluster.secret}\n")
    job = write_job(
        project / "job.yaml",
        {"function": jobs_function("funcs", "square"), "args_range": [0, 5]},
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_process(
        [PYTHON, CONSOLE_SCRIPT, "--server", cluster.address, "compute", str(job), "--json"],
        clean_env(tmp_path / "home"),
        cwd=elsewhere,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [0, 1, 4, 9, 16]


@pytest.mark.slow
def test_the_detach_hint_works_when_pasted(make_cluster: Any, tmp_path: Path) -> None:
    """`compute --detach` prints an attach command with the --server used; pasted into a shell
    it collects the results. Before, it said `remap attach N` with no server."""
    cluster: Cluster = make_cluster([NodeSpec(cores=1)])
    job = write_job(
        tmp_path / "job.yaml",
        {"function": jobs_function("funcs", "square"), "args_range": [0, 5]},
    )
    done = cluster.assert_ok(cluster.console("compute", job, "--detach"))
    hint = re.search(r"job (\d+) runs detached; collect results with: (.*)$", done.stdout.strip())
    assert hint, done.stdout
    job_id, command = hint.groups()
    assert f"--server {cluster.address}" in command, command
    pasted = subprocess.run(
        command, shell=True, env=cluster.env(), cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert pasted.returncode == 0, pasted.stderr
    assert [json.loads(line) for line in pasted.stdout.split()] == [0, 1, 4, 9, 16]
    assert shlex.split(command)[-2:] == ["attach", job_id]


# ---------------------------------------------------------------------- the shell


class StubSession:
    """A session that answers status from a fixed dict (for completion)."""

    settings = None

    def __init__(self, status: dict | None = None) -> None:
        self.status = status or {"jobs": [], "nodes": []}

    def can_request(self) -> bool:
        return True

    def request(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        assert method == "status"
        return self.status


def test_tab_completion_of_job_and_node_ids() -> None:
    """After kill/attach the shell completes job ids, after drain/undrain node ids, after help
    command names."""
    status = {
        "jobs": [{"id": 12}, {"id": 13}, {"id": 7}],
        "nodes": [{"id": "abcdef0123"}, {"id": "abd0000000"}, {"id": "ff00000000"}],
    }
    parser = build_parser()
    shell = Shell(Console(StubSession(status), out=io.StringIO(), parser=parser), parser)
    assert shell.completedefault("1", "kill 1", 5, 6) == ["12 ", "13 "]
    assert shell.completedefault("", "attach ", 7, 7) == ["12 ", "13 ", "7 "]
    assert shell.completedefault("ab", "drain ab", 6, 8) == ["abcdef0123 ", "abd0000000 "]
    assert shell.completedefault("f", "undrain f", 8, 9) == ["ff00000000 "]
    assert shell.completedefault("com", "help com", 5, 8) == ["compute "]


def test_the_shell_refuses_global_flags_it_cannot_apply() -> None:
    """In the shell the connection is already made: `status --server X` says so instead of
    silently asking the old server."""
    err = io.StringIO()
    parser = build_parser()
    shell = Shell(Console(StubSession(), out=io.StringIO(), err=err, parser=parser), parser)
    shell.onecmd("status --server h:1")
    assert err.getvalue().startswith("error: --server: the shell's settings are fixed"), (
        err.getvalue()
    )


@pytest.mark.slow
def test_status_works_in_a_fresh_shell(tmp_path: Path) -> None:
    """In the shell with no server, status before any compute shows the embedded cluster.
    Before, it said "no server configured" until the first compute."""
    done = console(
        tmp_path,
        "--env-file",
        "/dev/null",
        "--cores",
        "1",
        "shell",
        input="status\nquit\n",
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert "1 node, 0/1 cores busy" in done.stdout, done.stdout + done.stderr
    assert "error" not in done.stderr, done.stderr


@pytest.mark.slow
def test_undrain_lets_a_node_take_work_again(cluster: Cluster) -> None:
    """drain then undrain: the node is ready again and runs jobs."""
    node = cluster.status()["nodes"][0]["id"]
    cluster.assert_ok(cluster.console("drain", node[:8]))
    assert next(n for n in cluster.status()["nodes"] if n["id"] == node)["draining"]
    done = cluster.assert_ok(cluster.console("undrain", node[:8]))
    assert f"({node[:8]}) takes work again" in done.stdout
    assert not next(n for n in cluster.status()["nodes"] if n["id"] == node)["draining"]


@pytest.mark.slow
def test_kill_of_a_job_that_had_ended_says_so(make_cluster: Any, tmp_path: Path) -> None:
    """``kill ID`` of a job that ended already says it had ended and killed nothing; it said
    "job ID done", or "job ID killed" for one killed before, as if this kill had ended it."""
    c = make_cluster([NodeSpec(cores=1)])
    job = write_job(
        tmp_path / "sq.yaml", {"function": jobs_function("funcs", "square"), "args": [2]}
    )
    c.assert_ok(c.console("compute", job))
    job_id = str(c.status()["jobs"][0]["id"])
    for _ in range(2):
        done = c.assert_ok(c.console("kill", job_id))
        assert done.stdout.strip() == f"job {job_id} had already ended (done): nothing to kill"


@pytest.mark.slow
def test_attach_shows_a_stream_job_as_compute_does(make_cluster: Any, tmp_path: Path) -> None:
    """``attach`` of a detached ``stream`` job prints ``INDEX: value`` lines (``--json``: one
    object per line with its index), as ``compute`` of it does; it printed the bare values
    (and ``--json`` one array), so which argument a line belonged to was lost."""
    c = make_cluster([NodeSpec(cores=1)])
    job = write_job(
        tmp_path / "st.yaml",
        {
            "function": jobs_function("funcs", "square"),
            "args_range": [0, 4],
            "response_mode": "stream",
        },
    )
    job_id = str(
        json.loads(c.assert_ok(c.console("compute", job, "--detach", "--json")).stdout)["job"]
    )
    shown = c.assert_ok(c.console("attach", job_id, timeout=60))
    assert sorted(shown.stdout.splitlines()) == ["0: 0", "1: 1", "2: 4", "3: 9"]
    lines = c.assert_ok(c.console("attach", job_id, "--json", timeout=60)).stdout.splitlines()
    assert sorted(lines) == [json.dumps({"index": i, "result": i * i}) for i in range(4)]


def test_compute_json_prints_one_object_for_any_job_that_did_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compute --json`` prints one JSON object on stdout whatever stopped the job: a YAML
    typo, or a data or vertex job whose output exists (a function job whose function is
    missing already did), or a job the console refuses once loaded (a reduce job with
    ``detach: true``); stdout was empty for those, so a script read nothing at all."""
    from remap.console.main import main

    (tmp_path / "m.py").write_text(
        "def map(line):\n    yield line, 1\n\ndef reduce(k, vs):\n    yield k, 1\n"
    )
    (tmp_path / "v.py").write_text(
        "def prepare(line):\n    return None\n\ndef compute(ctx, v, value, ms):\n    return value, True\n"
    )
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "g.py").write_text("def g(a, b=0):\n    return a + b\n")
    jobs = {
        "typo.yaml": ("function: f.py:g\nargs_range: [0, 10\n", None, "invalid YAML"),
        "data.yaml": ("kind: mapreduce\nmodule: m.py\ninput: in.txt\noutput: out/\n", "mapreduce", "already exists"),
        "graph.yaml": ("kind: vertex\nmodule: v.py\ninput: in.txt\noutput: out/\n", "vertex", "already exists"),
        # refused by the console after the file loaded (it printed nothing on stdout)
        "folded.yaml": ("function: g.py:g\nargs: [1]\nresponse_mode: reduce\nreduce: g\ndetach: true\n", None, "cannot run detached"),
    }  # fmt: skip
    for name, (text, kind, why) in jobs.items():
        (tmp_path / name).write_text(text)
        code = main(["--env-file", "/dev/null", "compute", str(tmp_path / name), "--json"])
        out, err = capsys.readouterr()
        assert code == 2, err
        summary = json.loads(out)
        assert (summary["state"], summary["exit_code"], summary.get("kind")) == ("failed", 2, kind)
        assert why in summary["error"] and err.strip() == f"error: {summary['error']}"
        if kind is not None:
            assert "(remove it or choose another output)" in summary["error"], name


@pytest.mark.slow
def test_traceback_shows_where_a_data_or_vertex_jobs_code_raised(tmp_path: Path) -> None:
    """A data job's map and a vertex job's compute that raise fail with one line that offers
    ``--traceback``; with it, the user's file and line are printed (not remap's task loop,
    not ``<dynamic-code>``), as for a function job."""
    (tmp_path / "m.py").write_text(
        "def map(line):\n    raise ValueError('bad ' + line)\n\n"
        "def reduce(k, vs):\n    yield k, 1\n"
    )
    (tmp_path / "v.py").write_text(
        "def prepare(line):\n    return (1, 0, [])\n\n"
        "def compute(ctx, vid, value, messages):\n    raise KeyError(vid)\n"
    )
    (tmp_path / "in.txt").write_text("a\n")
    jobs = {
        "data.yaml": ("kind: mapreduce\nmodule: m.py\ninput: in.txt\noutput: o1/\n", "m.py\", line 2, in map"),
        "graph.yaml": ("kind: vertex\nmodule: v.py\ninput: in.txt\noutput: o2/\n", "v.py\", line 5, in compute"),
    }  # fmt: skip
    for name, (text, frame) in jobs.items():
        (tmp_path / name).write_text(text)
        plain = console(tmp_path, "--cores", "1", "compute", name, timeout=120)
        assert plain.returncode == 1, plain.stderr
        assert (
            plain.stderr.strip()
            .splitlines()[-1]
            .endswith("(add --traceback to see where it was raised)")
        ), plain.stderr
        shown = console(tmp_path, "--cores", "1", "compute", name, "--traceback", timeout=120)
        assert shown.returncode == 1, shown.stderr
        assert frame in shown.stderr and "<dynamic-code>" not in shown.stderr, shown.stderr
        assert "remap/data" not in shown.stderr and "remap/vertex" not in shown.stderr


def test_a_job_id_that_is_not_a_number_says_which_number_to_use() -> None:
    """``kill``/``attach`` take the server's job id; a data job's own id (what its lines and
    job directory show) is refused saying where the number is, not "invalid int value"."""
    from remap.console.main import UsageError

    parser = build_parser()
    for argv in (["kill", "20261202-012405-5d74c8"], ["attach", "abc"]):
        with pytest.raises(UsageError) as refused:
            parser.parse_args(argv)
        err = str(refused.value)
        assert "is not a job id: use the number `remap jobs` shows" in err, err
        assert ("[map|reduce ID]" in err) == (argv[0] == "kill"), err


def test_a_reduce_job_is_refused_detached_before_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compute remap_config.yaml --detach`` (the default job folds with ``reduce``) ran
    detached and printed an attach command that could only fail: attach cannot fold without
    the reduce function, so 10,000 results were computed for nothing. Refused at once, exit 2,
    before any server is looked for."""
    from remap.console.main import main

    root = Path(__file__).resolve().parent.parent
    for argv in (["--detach"], []):
        job = tmp_path / "job.yaml"
        job.write_text(
            (root / "remap_config.yaml")
            .read_text()
            .replace("remap_function.py", str(root / "remap_function.py"))
            + ("" if argv else "detach: true\n")
        )
        code = main(["--env-file", "/dev/null", "compute", str(job), *argv])
        err = capsys.readouterr().err
        assert code == 2 and "a reduce job cannot run detached" in err, err
