"""Real remap processes on loopback for end-to-end tests: a server, nodes, consoles.

A :class:`Cluster` starts ``remap_server.py`` on port 0 and N ``remap_node.py`` processes as
children with a clean environment (no ``REMAP_*`` variable of the developer's, ``HOME`` in a
temporary directory, a random secret), waits on conditions with deadlines (never a bare sleep),
and always kills every child it started on exit, even when the test failed. Each child's
output goes to a log file; :meth:`Cluster.diagnostics` shows their tails so a failing
assertion says what the server and nodes were doing.

Use it as a context manager, or through the ``cluster`` / ``make_cluster`` fixtures of
``tests/conftest.py``::

    with Cluster(tmp_path, nodes=[NodeSpec(cores=2), NodeSpec(cores=1, group="gpu")]) as c:
        done = c.console("compute", "job.yaml", "--json")
        c.assert_ok(done)
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

#: the repository root (the directory that holds ``remap_server.py``)
ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SERVER_SCRIPT = str(ROOT / "remap_server.py")
NODE_SCRIPT = str(ROOT / "remap_node.py")
CONSOLE_SCRIPT = str(ROOT / "remap_console.py")
#: the directory of test job files and their function modules
JOBS = Path(__file__).resolve().parent / "jobs"

#: seconds a child gets between SIGTERM and SIGKILL at teardown
TERM_GRACE = 2.0
#: how often wait_for polls its condition
POLL = 0.05
#: lines of each child's log shown by diagnostics()
LOG_TAIL = 40


#: what a process must not say about a stop it was asked for
STOP_ALARMS = re.compile(
    r"lost|reconnect|Scheduling retry|error|Unhandled|Traceback", re.IGNORECASE
)


def alarming_lines(log: str) -> list[str]:
    """Lines of a child's log that claim a loss, a reconnect, an error or a traceback."""
    return [line for line in log.splitlines() if STOP_ALARMS.search(line)]


class ClusterError(AssertionError):
    """The cluster did not reach the state a test waited for (with the children's logs)."""


class ConsoleFailed(RuntimeError):
    """A console command the harness itself ran (``status``) exited non-zero; retried by waits."""


def clean_env(home: Path | str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ minus every REMAP_* variable, with HOME, PYTHONPATH and ``extra`` set.

    Discovery is off unless ``extra`` turns it on: tests never multicast on the host's network.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env["REMAP_DISCOVERY"] = "off"
    env["HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSTARTUP", None)
    env.update(extra or {})
    return env


def wait_then(started: str, release: str, x: int) -> int:
    """A task: says it started (its pid in the file ``started``), then waits up to a minute for
    the file ``release``."""
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def held_until(release: str, x: int) -> int:
    """A task: call 1 waits (up to a minute) for the release file; the others return at once
    (a slow call among fast ones, for head-of-line tests)."""
    deadline = time.monotonic() + 60
    while x == 1 and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def wait_for(
    cond: Callable[[], Any], timeout: float, what: str, describe: Callable[[], str] | None = None
) -> Any:
    """Poll ``cond`` every 50 ms until it returns something truthy; return that value.

    Fails with ``what`` (and ``describe()``, if given) when ``timeout`` seconds pass first.
    Other exceptions of the condition are retried and shown if the deadline passes; a
    :class:`ClusterError` from the condition means "this will never happen" and fails at once.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = cond()
        except ClusterError as exc:
            message = f"gave up waiting for {what}: {exc}"
            if describe is not None:
                message += "\n" + describe()
            raise ClusterError(message) from None
        except Exception as exc:  # noqa: BLE001 - reported if the deadline passes
            last_error = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:g}s waiting for {what}"
            if last_error is not None:
                message += f" (last error: {type(last_error).__name__}: {last_error})"
            if describe is not None:
                message += "\n" + describe()
            raise ClusterError(message)
        time.sleep(POLL)


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the test process dies, so no child outlives a crashed run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: teardown and atexit still clean up
        pass


_PREEXEC = _die_with_parent if sys.platform.startswith("linux") else None


@dataclass
class NodeSpec:
    """How to start one node: its cores, group and extra environment (e.g. a marker)."""

    cores: int = 1
    group: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()


@dataclass
class Child:
    """One started process, its log file, and what it is for (shown in diagnostics)."""

    name: str
    proc: subprocess.Popen
    log: Path
    spec: NodeSpec | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.exit_code() is None

    def exit_code(self) -> int | None:
        """Like ``Popen.poll()`` (negative for a signal) but without reaping: a reaped child's
        pid could be reused, and teardown still has to signal this child's process group."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere; let Popen find out
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group this harness created for ``proc`` (the child and its cores).

    Only while ``proc`` is not reaped: until then its pid (the group's id) cannot be reused,
    so the signal cannot reach a stranger's processes.
    """
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``proc`` exited, without reaping it (so its group can still be signalled)."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:  # reaped elsewhere
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _stop_processes(procs: Iterable[subprocess.Popen], grace: float = TERM_GRACE) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    procs = [p for p in procs if p.returncode is None]
    for proc in procs:
        _kill_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        _wait_exited(proc, max(0.0, deadline - time.monotonic()))
    for proc in procs:
        # the whole group even if the leader exited: a node's cores may outlive it
        _kill_group(proc, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for cluster in list(_LIVE):
        cluster.stop(grace=0.2)


class Cluster:
    """A server and nodes as real processes on 127.0.0.1, torn down without fail."""

    def __init__(
        self,
        tmp: Path | str,
        nodes: Sequence[NodeSpec] | int = 2,
        *,
        cores: int = 1,
        secret: str | None = None,
        heartbeat: float | None = 0.5,
        env: Mapping[str, str] | None = None,
        server_env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.tmp = Path(tmp)
        self.home = self.tmp / "home"
        self.logs = self.tmp / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port_file = self.tmp / "server.port"
        self.node_specs = (
            [NodeSpec(cores=cores) for _ in range(nodes)] if isinstance(nodes, int) else list(nodes)
        )
        self.secret = secret or secrets.token_urlsafe(24)
        self.heartbeat = heartbeat
        self.extra_env = dict(env or {})
        self.server_env = dict(server_env or {})
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.server: Child | None = None
        self.nodes: list[Child] = []
        self.consoles: list[subprocess.Popen] = []
        self._retired: list[Child] = []
        self._counter = 0

    # ------------------------------------------------------------------ environment

    @property
    def address(self) -> str:
        assert self.port is not None, "the server has not started"
        return f"127.0.0.1:{self.port}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment every child gets: clean, this cluster's secret and heartbeat."""
        env = clean_env(self.home, {"REMAP_SECRET_KEY": self.secret})
        if self.heartbeat is not None:
            env["REMAP_HEARTBEAT_INTERVAL"] = str(self.heartbeat)
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def _spawn(
        self, name: str, argv: list[str], env: Mapping[str, str], spec: NodeSpec | None = None
    ) -> Child:
        self._counter += 1
        log = self.logs / f"{self._counter:02d}-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=self.tmp,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        return Child(name, proc, log, spec)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Start the server, then every node; return once status lists them all."""
        _LIVE.add(self)
        self.start_server()
        for spec in self.node_specs:
            self._start_node(spec)
        self.wait_for_node_pids([n.pid for n in self.nodes])
        return self

    def start_server(self, port: int = 0) -> None:
        """Start a server on ``port`` (0 = a free one) and wait until it wrote its port file."""
        self.port_file.unlink(missing_ok=True)
        argv = [
            PYTHON,
            SERVER_SCRIPT,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-file",
            str(self.port_file),
            "--env-file",
            "/dev/null",
        ]
        self.server = self._spawn("server", argv, self.env(self.server_env))
        server = self.server

        def port_written() -> int | None:
            if not server.alive():
                raise ClusterError(f"the server exited with code {server.exit_code()}")
            try:
                text = self.port_file.read_text()
            except FileNotFoundError:
                return None
            # the server writes "PORT\n" in one go: wait for the newline, not a partial number
            return int(text) if text.endswith("\n") and text.strip().isdigit() else None

        self.port = self.wait_for(port_written, self.start_timeout, "the server's port file")

    def _start_node(self, spec: NodeSpec) -> Child:
        argv = [
            PYTHON,
            NODE_SCRIPT,
            "--server",
            self.address,
            "--cores",
            str(spec.cores),
            "--env-file",
            "/dev/null",
        ]
        if spec.group:
            argv += ["--group", spec.group]
        argv += list(spec.args)
        child = self._spawn(f"node{len(self.nodes)}", argv, self.env(spec.env), spec)
        self.nodes.append(child)
        return child

    def add_node(
        self,
        cores: int = 1,
        group: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Start one more node; return its index in :attr:`nodes` (after it joined, if ``wait``)."""
        child = self._start_node(NodeSpec(cores=cores, group=group, env=dict(env or {})))
        if wait:
            self.wait_for_node_pids([child.pid], timeout=timeout)
        return len(self.nodes) - 1

    def kill_node(self, index: int, sig: int = signal.SIGKILL, *, timeout: float = 10.0) -> None:
        """Send ``sig`` to node ``index`` only and wait for it to exit.

        Its cores are left to notice, as after a real crash; teardown kills any that linger.
        """
        child = self.nodes[index]
        try:
            child.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        self.wait_for(lambda: not child.alive(), timeout, f"node {index} (pid {child.pid}) to exit")

    def live_nodes(self) -> list[Child]:
        return [n for n in self.nodes if n.alive()]

    def restart_server(
        self, sig: int = signal.SIGTERM, *, wait_nodes: bool = True, timeout: float = 30.0
    ) -> None:
        """Stop the server with ``sig``, start a new one on the same port, wait for nodes to rejoin."""
        self.kill_server(sig, timeout=timeout)
        self.start_server(self.port)
        if wait_nodes:
            self.wait_for_node_pids([n.pid for n in self.live_nodes()], timeout=timeout)

    def kill_server(self, sig: int = signal.SIGKILL, *, timeout: float = 30.0) -> None:
        """Stop the server with ``sig`` and wait until it exited; :meth:`start_server` with
        :attr:`port` starts it again where it was."""
        assert self.server is not None and self.port is not None
        old = self.server
        self._retired.append(old)
        _kill_group(old.proc, sig)
        self.wait_for(
            lambda: _wait_exited(old.proc, 0), timeout, f"the server (pid {old.pid}) to exit"
        )
        _kill_group(old.proc, signal.SIGKILL)
        old.proc.wait()

    def stop(self, grace: float = TERM_GRACE) -> None:
        """Kill every child this cluster started: SIGTERM, then SIGKILL after ``grace``. Idempotent."""
        procs = [c.proc for c in self.nodes] + list(self.consoles)
        if self.server is not None:
            procs.append(self.server.proc)
        procs += [c.proc for c in self._retired]
        _stop_processes(procs, grace)
        for proc in self.consoles:
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        _LIVE.discard(self)

    # ------------------------------------------------------------------ waiting

    def diagnostics(self) -> str:
        """The tail of every child's log, for assertion messages."""
        parts = []
        children = ([self.server] if self.server else []) + self.nodes + self._retired
        for child in children:
            code = child.exit_code()
            state = "running" if code is None else f"exited {code}"
            lines = child.log_text().splitlines()[-LOG_TAIL:]
            parts.append(
                f"--- {child.name} (pid {child.pid}, {state}) {child.log.name}:\n"
                + "\n".join(lines)
            )
        return "\n".join(parts)

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``cond`` until truthy or fail with ``what`` and the children's logs."""
        return wait_for(cond, timeout, what, describe=self.diagnostics)

    def wait_for_nodes(
        self, count: int, timeout: float | None = None, group: str | None = None
    ) -> dict:
        """Wait until status lists exactly ``count`` nodes (of ``group``, if given); return the status."""

        def enough() -> dict | None:
            status = self.status(timeout=10)
            nodes = [n for n in status["nodes"] if group is None or n["group"] == group]
            return status if len(nodes) == count else None

        return self.wait_for(enough, timeout or self.start_timeout, f"{count} node(s) in status")

    def wait_for_node_pids(self, pids: Iterable[int], timeout: float | None = None) -> dict:
        """Wait until every node process in ``pids`` is connected (status reports node pids)."""
        wanted = set(pids)

        def joined() -> dict | None:
            dead = [n for n in self.nodes if n.pid in wanted and not n.alive()]
            if dead:
                raise ClusterError(
                    ", ".join(f"{n.name} exited with code {n.exit_code()}" for n in dead)
                )
            status = self.status(timeout=10)
            return status if wanted <= {n.get("pid") for n in status["nodes"]} else None

        return self.wait_for(
            joined, timeout or self.start_timeout, f"nodes {sorted(wanted)} to connect"
        )

    # ------------------------------------------------------------------ consoles

    def console_argv(self, args: Sequence[str], server: bool = True) -> list[str]:
        argv = [PYTHON, CONSOLE_SCRIPT]
        if server:
            argv += ["--server", self.address]
        return argv + ["--env-file", "/dev/null", *map(str, args)]

    def console(
        self,
        *args: Any,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        server: bool = True,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``remap_console.py --server ADDRESS --env-file /dev/null ARGS``; capture output.

        A console that outlives ``timeout`` is killed and the test fails with its output so far
        and the cluster's logs.
        """
        proc = self.console_popen(
            *args,
            env=env,
            server=server,
            cwd=cwd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        )
        return self.finish(proc, timeout=timeout, input=input)

    def console_popen(
        self,
        *args: Any,
        env: Mapping[str, str] | None = None,
        server: bool = True,
        cwd: Path | str | None = None,
        stdin: Any = subprocess.DEVNULL,
    ) -> subprocess.Popen:
        """Start a console without waiting; stdout and stderr are pipes (text). See :meth:`finish`."""
        proc = subprocess.Popen(
            self.console_argv(args, server=server),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(env),
            cwd=cwd or self.tmp,
            start_new_session=True,
            preexec_fn=_PREEXEC,
        )
        self.consoles.append(proc)
        return proc

    def finish(
        self, proc: subprocess.Popen, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Wait for a console started with :meth:`console_popen`; kill it and fail on timeout."""
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            raise ClusterError(
                f"console {proc.args[2:]} did not finish within {timeout:g}s\n"
                f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}\n{self.diagnostics()}"
            ) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def explain(self, done: subprocess.CompletedProcess) -> str:
        """A console run and the cluster's logs, for an assertion message."""
        return (
            f"console {done.args[2:]} exited {done.returncode}\n"
            f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}\n{self.diagnostics()}"
        )

    def assert_ok(self, done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        assert done.returncode == 0, self.explain(done)
        return done

    def run_script(
        self,
        script: Path | str,
        *args: Any,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess:
        """Run a Python script with this cluster's environment (secret, heartbeat, clean HOME)."""
        return run_process(
            [PYTHON, str(script), *map(str, args)], self.env(env), cwd=self.tmp, timeout=timeout
        )

    def status(self, timeout: float = 20.0) -> dict:
        """``status --json``, parsed; fails (with logs) if the console does not succeed.

        A console that outlives ``timeout`` is :class:`ConsoleFailed` too, so a wait retries it
        until its own deadline: a console starved for seconds on a loaded machine is not a
        state that can never be reached (a :class:`ClusterError` ends a wait at once).
        """
        try:
            done = self.console("status", "--json", timeout=timeout)
        except ClusterError:
            raise ConsoleFailed(f"status did not finish within {timeout:g}s") from None
        if done.returncode != 0:
            raise ConsoleFailed(f"status exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout)

    def job(self, job_id: int) -> dict | None:
        """The job ``job_id`` as ``status`` shows it, or None."""
        return next((j for j in self.status()["jobs"] if j["id"] == job_id), None)

    def http_port(self, timeout: float = 10.0) -> int:
        """The port of the server's HTTP face (started with ``REMAP_HTTP_PORT=0``), from its log."""
        found = self.wait_for(
            lambda: re.search(r"dashboard: http://[^:]+:(\d+)/", self.server.log_text()),
            timeout,
            "the HTTP port in the server's log",
        )
        return int(found.group(1))


class ClusterFactory:
    """Makes clusters in fresh subdirectories and stops them all at :meth:`close`."""

    def __init__(self, tmp: Path | str) -> None:
        self.tmp = Path(tmp)
        self.clusters: list[Cluster] = []

    def __call__(self, nodes: Sequence[NodeSpec] | int = 2, **kwargs: Any) -> Cluster:
        where = self.tmp / f"cluster{len(self.clusters)}"
        cluster = Cluster(where, nodes, **kwargs)
        self.clusters.append(cluster)
        cluster.start()
        return cluster

    def close(self) -> None:
        for cluster in self.clusters:
            cluster.stop()


def run_process(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: Path | str,
    timeout: float = 60.0,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a child to completion with captured text output; its process group dies on timeout."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_PREEXEC,
    )
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise ClusterError(
            f"{list(argv)[1:]} did not finish within {timeout:g}s\n"
            f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_entry(
    script: Path | str,
    *args: Any,
    home: Path | str,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run an entry point (``SERVER_SCRIPT``, ``NODE_SCRIPT``, ``CONSOLE_SCRIPT``) or any script
    with a clean environment (plus ``env``), outside any cluster."""
    return run_process(
        [PYTHON, str(script), *map(str, args)],
        clean_env(home, env),
        cwd=cwd or home,
        timeout=timeout,
        input=input,
    )


def write_job(path: Path | str, lines: str | Mapping[str, Any], **values: Any) -> Path:
    """Write a job file. ``lines`` is YAML text, or a mapping dumped as JSON-flavoured YAML."""
    path = Path(path)
    if isinstance(lines, str):
        text = lines
    else:
        text = "".join(
            f"{key}: {json.dumps(value)}\n" for key, value in {**lines, **values}.items()
        )
    path.write_text(text)
    return path


def load_module(path: Path | str) -> ModuleType:
    """Import a file of test functions under a private name (to compute expectations locally)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"remap_tests_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jobs_function(module: str, name: str) -> str:
    """``/abs/path/tests/jobs/MODULE.py:NAME`` for a job file written outside tests/jobs."""
    return f"{JOBS / module}.py:{name}"
