"""Jobs submitted over HTTP: only functions in the apps directory, results as JSON lines."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import pytest

from remap.server.http.security import derive_token
from remap.server.http.submit import SubmitError, parse_body, prepare
from tests.cluster_harness import NodeSpec
from tests.http_harness import Served


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    apps = tmp_path / "apps"
    (apps / "pkg").mkdir(parents=True)
    (apps / "squares.py").write_text(
        "import time\n\ndef square(x):\n    return x * x\n\n"
        "def slow(x):\n    time.sleep(0.2)\n    return x\n"
    )
    (apps / "pkg" / "__init__.py").write_text("")
    (apps / "pkg" / "tools.py").write_text("def neg(x):\n    return -x\n")
    (tmp_path / "outside.py").write_text("def f(x):\n    return x\n")
    return apps


def test_a_job_files_error_names_no_line_the_client_did_not_write(
    apps: Path, tmp_path: Path
) -> None:
    """A YAML job's typo on its line 2 was reported at "<submitted job>:1": the line of the
    one-line JSON the server checks, not the client's; the error names the job file, no line."""
    raw = parse_body(b"function: squares.py:square\nargs_rage: [0, 3]\n", "application/yaml")
    with pytest.raises(SubmitError) as refused:
        prepare(raw, apps, tmp_path / "data")
    assert str(refused.value) == (
        "the job file: unknown key 'args_rage'; did you mean 'args_range'?"
    )


@pytest.mark.parametrize(
    ("job", "problem"),
    [
        ({"function": "os:system", "args": ["id"]}, "not a file in the server's apps directory"),
        ({"function": "subprocess:call", "args": [["id"]]}, "apps directory"),
        ({"function": "../outside.py:f", "args": [1]}, "apps directory"),
        ({"function": "/etc/passwd.py:f", "args": [1]}, "apps directory"),
        ({"function": "squares.py:square", "args_path": "/etc/passwd"}, "args_path"),
        ({"function": "squares.py:square", "args": [1], "output": "/tmp/x"}, "output"),
        ({"function": "squares.py:square", "args": [1], "kind": "vertex"}, "kind"),
        (
            {"function": "squares.py:square", "args": [1], "response_mode": "sqlite"},
            "response_mode",
        ),
        ({"function": "squares.py:square", "args": [1], "reduce": "os:getcwd"}, "apps directory"),
        ({"function": "squares.py:square"}, "args"),  # the job-file loader's own check
        # shipped files and modules: only from the apps directory (no server file ships)
        ({"function": "squares.py:square", "args": [1], "files": ["/etc/passwd"]}, "apps dir"),
        ({"function": "squares.py:square", "args": [1], "files": "../outside.py"}, "apps dir"),
        ({"function": "squares.py:square", "args": [1], "files": ["nope.csv"]}, "apps dir"),
        ({"function": "squares.py:square", "args": [1], "files": [{"a": 1}]}, "apps dir"),
        ({"function": "squares.py:square", "args": [1], "modules": ["yaml"]}, "apps dir"),
        ({"function": "squares.py:square", "args": [1], "modules": ["../outside.py"]}, "apps"),
        ({"function": "squares.py:square", "args": [1], "modules": ["/etc"]}, "apps dir"),
        ({"args": [1]}, "function"),
    ],
)
def test_refused_jobs(apps: Path, tmp_path: Path, job: dict, problem: str) -> None:
    """Anything naming code or files outside the apps directory is refused before any import."""
    with pytest.raises(SubmitError, match=re.escape(problem)):
        prepare(job, apps, tmp_path / "data")


@pytest.mark.parametrize(
    "function",
    [
        "tools.py:check_output",  # imported by the file, not written there
        "tools.py:system",
        "tools.py:run_it",
        "tools.py:__class__",  # a module attribute (ModuleType: callable)
        "tools.py:__getattribute__",
        "tools.py:shell",  # defined, then rebound by an import
    ],
)
def test_names_an_apps_file_imports_are_refused(apps: Path, tmp_path: Path, function: str) -> None:
    """The token runs what the operator wrote in the apps directory: a callable a file there
    merely imports (``from subprocess import check_output``: any command on the nodes, its
    output in the results) or a module attribute is refused, as ``subprocess:check_output``
    itself is; what the file defines, under ``if`` or ``try`` too, is accepted."""
    (apps / "tools.py").write_text(
        "import os\nfrom os import system\nfrom subprocess import check_output\n"
        "from subprocess import run as run_it\n\n"
        "def version():\n    return check_output(['uname'])\n\n"
        "try:\n    import json\nexcept ImportError:\n    pass\nelse:\n"
        "    def dumps(x):\n        return json.dumps(x)\n\n"
        "twice = lambda x: 2 * x\n\n"
        "def shell(x):\n    return x\n\nif True:\n    from os import popen as shell\n"
    )
    with pytest.raises(SubmitError, match="written in tools.py"):
        prepare({"function": function, "args": [["id"]]}, apps, tmp_path / "data")
    for name in ("version", "dumps", "twice"):
        prepare({"function": f"tools.py:{name}", "args": [1]}, apps, tmp_path / "data")


def test_only_definitions_and_assignments_make_a_name_the_files_own(
    apps: Path, tmp_path: Path
) -> None:
    """A ``for`` or ``with`` target is not something the operator wrote as a job function: a
    loop over imported functions (a common way to register them) leaves the loop variable
    bound to imported code, which stays refused. Nor does an attribute assignment make its
    base the file's own; unpacking assignments do count."""
    (apps / "bound.py").write_text(
        "import contextlib\nfrom os import getpid, getcwd\n\n"
        "for fn in (getpid, getcwd):\n    pass\n\n"
        "with contextlib.nullcontext(abs) as size:\n    pass\n\n"
        "contextlib.extra = 1\nhelper.extra = 1\n"
        "double, triple = (lambda x: 2 * x), (lambda x: 3 * x)\n"
    )
    for name in ("fn", "size", "helper"):
        with pytest.raises(SubmitError, match=f"no function '{name}' written in bound.py"):
            prepare({"function": f"bound.py:{name}", "args": [1]}, apps, tmp_path / "data")
    for name in ("double", "triple"):
        prepare({"function": f"bound.py:{name}", "args": [1]}, apps, tmp_path / "data")


def test_a_data_directory_everyone_may_write_runs_no_submitted_job(
    apps: Path, tmp_path: Path
) -> None:
    """The console child runs the job file the server writes under the data directory: with
    one everyone may write, a submission is refused (no server path in the answer)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    data.chmod(0o777)
    with pytest.raises(SubmitError, match="writable by everyone") as refused:
        prepare({"function": "squares.py:square", "args": [1]}, apps, data)
    assert str(data) not in str(refused.value) and not (data / "http").exists()


def test_accepted_jobs_run_from_the_apps_directory(apps: Path, tmp_path: Path) -> None:
    """FILE.py and module references become absolute paths inside the apps directory."""
    sub = prepare({"function": "pkg.tools:neg", "args_range": [0, 3]}, apps, tmp_path / "d")
    written = json.loads((sub.directory / "job.json").read_text())
    assert written["function"] == f"{apps / 'pkg' / 'tools.py'}:neg"
    assert written["output"] == str(sub.results) and written["response_mode"] == "file"
    assert sub.name.startswith("tools [http ")


def test_shipped_files_and_modules_come_from_the_apps_directory(apps: Path, tmp_path: Path) -> None:
    """``files:`` and ``modules:`` name things in the apps directory and are written as its
    absolute paths (the console child reads the job file from the data directory); a link in
    the apps directory to a file outside it is refused like the outside path itself."""
    (apps / "table.csv").write_text("a,b\n")
    (tmp_path / "secret").write_text("s3cret")
    (apps / "leak.txt").symlink_to(tmp_path / "secret")
    job = {"function": "squares.py:square", "args": [1], "files": ["table.csv"]}
    sub = prepare({**job, "modules": ["pkg", "squares"]}, apps, tmp_path / "d")
    written = json.loads((sub.directory / "job.json").read_text())
    assert written["files"] == [str(apps / "table.csv")]
    assert written["modules"] == [str(apps / "pkg"), str(apps / "squares.py")]
    for files in (["leak.txt"], [str(tmp_path / "secret")], ["pkg/../../secret"]):
        with pytest.raises(SubmitError, match="is not a file in the server's apps directory"):
            prepare({**job, "files": files}, apps, tmp_path / "d")


def test_a_package_whose_submodule_links_out_of_the_apps_directory_is_refused(
    apps: Path, tmp_path: Path
) -> None:
    """A package in the apps directory ships every ``.py`` under it: one that is a link to a
    file outside (a submodule, or one in a subpackage) refuses the job, naming it; links
    that stay inside the apps directory are fine."""
    (tmp_path / "secret.py").write_text("KEY = 's3cret'\n")
    (apps / "pkg" / "inner").mkdir()
    (apps / "pkg" / "inner" / "__init__.py").write_text("")
    (apps / "pkg" / "same.py").symlink_to(apps / "squares.py")
    job = {"function": "squares.py:square", "args": [1], "modules": ["pkg"]}
    prepare(job, apps, tmp_path / "d")
    (apps / "pkg" / "inner" / "leak.py").symlink_to(tmp_path / "secret.py")
    with pytest.raises(SubmitError, match=re.escape("pkg/inner/leak.py of 'pkg' links out")):
        prepare(job, apps, tmp_path / "d")


def test_bodies() -> None:
    """JSON and YAML bodies parse to a mapping; anything else is one clear error."""
    assert parse_body(b'{"function": "a.py:f"}', "application/json") == {"function": "a.py:f"}
    assert parse_body(b"function: a.py:f\n", "application/yaml") == {"function": "a.py:f"}
    for body, kind in (
        (b"[1]", "application/json"),
        (b"{", "application/json"),
        (b"x" * 70000, "text/yaml"),
    ):
        with pytest.raises(SubmitError):
            parse_body(body, kind)
    with pytest.raises(SubmitError) as typo:  # one line naming the line, as the console says
        parse_body(b"function: a.py:f\nargs_range: [0, 100\n", "application/yaml")
    assert str(typo.value) == (
        "the job file:3: invalid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence started on line 2)"
    )


def test_submit_is_off_without_an_apps_dir() -> None:
    """With no REMAP_APPS_DIR the route answers 403 and starts nothing."""
    served = Served()
    try:
        reply = served.request(
            "POST", "/api/v1/jobs", token=served.token,
            headers={"Content-Type": "application/json"}, body=b'{"function": "a.py:f"}',
        )  # fmt: skip
        assert reply.status == 403 and "REMAP_APPS_DIR" in reply.json()["message"]
        assert served.scheduler.jobs == {}
    finally:
        served.stop()


def test_an_apps_dir_that_is_not_a_directory_stops_the_server(tmp_path: Path) -> None:
    """A mistyped REMAP_APPS_DIR is one clear error at start, not a server that refuses every
    job submitted over HTTP as naming no file of its apps directory."""
    from remap.errors import ConfigError
    from remap.settings import Settings

    for apps in (tmp_path / "nope", tmp_path / "file.py"):
        (tmp_path / "file.py").write_text("")
        with pytest.raises(ConfigError, match=f"REMAP_APPS_DIR: {apps} is not a directory"):
            Served(Settings(http_port=0, apps_dir=str(apps)))


def test_results_of_a_job_submitted_before_a_restart(apps: Path, tmp_path: Path) -> None:
    """After a restart the journal has the jobs submitted over HTTP, and their results files
    are where that run's console children wrote them: the results route serves a finished
    one (it said 404 "was not submitted over HTTP"), says 202 for a running one, 409 naming
    the end and its reason for one killed (it was an empty 200, read as "no results"), and
    still 404 for a job a console ran. The file is streamed on the HTTP face's own reactor (a
    pull producer waited for the global reactor, which does not run here: it never ended).
    """
    from protocol import messages as m
    from remap import runtime
    from remap.settings import Settings

    data = tmp_path / "data"
    served = Served(Settings(http_port=0, apps_dir=str(apps), data_dir=str(data)))
    try:
        ended, running, killed = (
            prepare({"function": "squares.py:square", "args_range": [0, 2]}, apps, data)
            for _ in range(3)
        )
        lines = 100_000  # megabytes: sent in chunks, the peer's pace followed, then ended
        ended.results.write_text(
            "".join(f'{{"index": {i}, "result": {i}}}\n' for i in range(lines))
        )
        done_id = served.add_job(name=ended.name, total=0)
        running_id = served.add_job(name=running.name)
        killed_id = served.add_job(name=killed.name)
        console_id = served.add_job(name="by a console")

        def end() -> None:
            scheduler = served.scheduler
            scheduler.args_ended(scheduler.jobs[done_id].console, m.ArgsEnd(job=done_id, total=0))
            scheduler.kill(killed_id, "killed on request")

        runtime.run(end)
        assert served.scheduler.jobs[done_id].state == "done"
        reply = served.request("GET", f"/api/v1/jobs/{done_id}/results", token=served.token)
        assert reply.status == 200, reply.body
        assert [json.loads(line)["result"] for line in reply.body.splitlines()] == [*range(lines)]
        reply = served.request("GET", f"/api/v1/jobs/{killed_id}/results", token=served.token)
        assert reply.status == 409, reply.body
        assert reply.json() == {
            "error": "job-killed",
            "message": f"job {killed_id} killed: killed on request",
        }
        path = f"/api/v1/jobs/{running_id}/results?wait=true"
        reply = served.request("GET", path, token=served.token)
        assert reply.status == 202 and "restarted" in reply.json()["message"]
        path = f"/api/v1/jobs/{console_id}/results"
        assert served.request("GET", path, token=served.token).status == 404
    finally:
        served.stop()


def test_results_follow_a_slow_reader_and_close_when_it_leaves(apps: Path, tmp_path: Path) -> None:
    """A results file far larger than the socket buffers reaches a reader that takes it a
    little at a time whole and in order (the server pauses and resumes with the peer), and a
    reader that leaves halfway has the file closed on the server (nothing left open per
    departed client)."""
    import contextlib
    import os
    import socket
    import time

    from protocol import messages as m
    from remap import runtime
    from remap.settings import Settings

    data = tmp_path / "data"
    served = Served(Settings(http_port=0, apps_dir=str(apps), data_dir=str(data)))
    try:
        ended = prepare({"function": "squares.py:square", "args_range": [0, 2]}, apps, data)
        line = b'{"index": 0, "result": "' + b"x" * 1000 + b'"}\n'
        ended.results.write_bytes(line * 24_000)  # about 24 MB
        job_id = served.add_job(name=ended.name, total=0)
        runtime.run(
            lambda: served.scheduler.args_ended(
                served.scheduler.jobs[job_id].console, m.ArgsEnd(job=job_id, total=0)
            )
        )
        ask = (
            f"GET /api/v1/jobs/{job_id}/results HTTP/1.0\r\nHost: {served.host}\r\n"
            f"Authorization: Bearer {served.token}\r\n\r\n"
        ).encode()

        def read(limit: int) -> bytes:
            got = bytearray()
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
                sock.sendall(ask)
                while len(got) < limit and (piece := sock.recv(4096)):
                    got += piece
            return bytes(got)

        body = read(1 << 40).partition(b"\r\n\r\n")[2]
        assert body == line * 24_000

        def open_results() -> int:
            count = 0
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):  # (closed since listed)
                    count += os.readlink(f"/proc/self/fd/{fd}") == str(ended.results)
            return count

        assert len(read(1 << 20)) >= 1 << 20  # then it leaves, most of the file unsent
        deadline = time.monotonic() + 10
        while open_results() and time.monotonic() < deadline:
            runtime.run(lambda: None)  # a reactor turn
        assert open_results() == 0
    finally:
        served.stop()


@pytest.mark.slow
def test_submit_over_http_and_read_the_results(make_cluster, apps: Path, tmp_path: Path) -> None:
    """A YAML job file posted with the token runs on the cluster; its results come back as
    JSON lines in argument order; a refused job says why; a cross-site form cannot submit."""
    cluster = make_cluster(
        [NodeSpec(cores=1)],
        server_env={
            "REMAP_HTTP_PORT": "0",
            "REMAP_APPS_DIR": str(apps),
            "REMAP_DATA_DIR": str(tmp_path / "data"),
        },
    )
    port = int(
        cluster.wait_for(
            lambda: re.search(r"dashboard: http://[^:]+:(\d+)/", cluster.server.log_text()),
            10,
            "the HTTP port",
        ).group(1)
    )
    token = derive_token(cluster.secret.encode())

    def call(method: str, path: str, body: bytes | None = None, **headers: str):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            method, path, body=body, headers={"Authorization": f"Bearer {token}", **headers}
        )
        reply = conn.getresponse()
        data = reply.read()
        conn.close()
        return reply.status, data

    job = b"function: squares.py:square\nargs_range: [0, 50]\nname: sq\n"
    status, data = call("POST", "/api/v1/jobs", job, **{"Content-Type": "application/yaml"})
    assert status == 201, data
    made = json.loads(data)
    assert made["name"].startswith("sq [http ")
    status, data = call("GET", made["results"] + "?wait=true")
    assert status == 200 and cluster.job(made["job"])["state"] == "done"
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert [line["result"] for line in lines] == [i * i for i in range(50)]

    # a job that fails: its results say so (409, why), not an empty 200 read as "no results"
    job = b'function: squares.py:square\nargs: ["a"]\n'
    status, data = call("POST", "/api/v1/jobs", job, **{"Content-Type": "application/yaml"})
    assert status == 201, data
    failed = json.loads(data)["job"]
    status, data = call("GET", f"/api/v1/jobs/{failed}/results?wait=true")
    assert status == 409, data
    assert json.loads(data) == {
        "error": "job-failed",
        "message": f"job {failed} failed: argument 0 raised TypeError: "
        "can't multiply sequence by non-int of type 'str'",
    }

    status, data = call(
        "POST", "/api/v1/jobs", b'{"function": "squares.py:nope", "args": [1]}',
        **{"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 400
    # the client's view of the job: no server paths (job file, apps directory, results file)
    assert json.loads(data)["message"] == (
        "the job file: key 'function': no function 'nope' written in squares.py (only "
        "functions written in the server's apps directory run, not names a file there imports)"
    ), data
    status, _ = call(
        "POST", "/api/v1/jobs", b"function=os:system", **{"Content-Type": "text/plain"}
    )
    assert status == 415
