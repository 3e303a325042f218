"""Security end to end: real server, node and console processes on 127.0.0.1.

Each test starts what it needs on port 0 (``--port 0 --port-file``) through :class:`Cluster`,
which kills every process group it started when the test ends, pass or fail. Children get
an environment built from scratch: no REMAP_* variable of the developer, HOME in tmp_path,
``--env-file /dev/null`` (no settings file). Nothing listens on anything but loopback.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol import Connection, ConnectionFailed, HandshakeTimeout
from protocol import messages as m
from protocol.framing import FrameDecoder, encode_frame

REPO = Path(__file__).resolve().parent.parent
SECRET = "e2e-right-secret"
WRONG = "e2e-wrong-secret"
START_TIMEOUT = 20.0

pytestmark = pytest.mark.slow


# =========================================================================== process harness


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` every ``interval`` s until truthy; fail clearly after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def child_env(home: Path, **settings: Any) -> dict[str, str]:
    """os.environ minus every REMAP_* key, plus HOME, PYTHONPATH and the given REMAP_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env.update(
        HOME=str(home), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1"
    )
    env.update({k: str(v) for k, v in settings.items() if v is not None})
    return env


class Proc:
    """One child process in its own process group, output to files (never a full pipe)."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path, logs: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{self.name} did not exit within {timeout}s; stderr:\n{self.stderr()[-3000:]}"
            )

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the group, then SIGKILL it: the process and any cores it started."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # the group this Popen created (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


class Cluster:
    """Starts servers, nodes and consoles for one test and always tears them down."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: list[Proc] = []
        self._count = 0

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}{self._count}"

    def env(self, secret: str | None = SECRET, **settings: Any) -> dict[str, str]:
        return child_env(self.home, REMAP_SECRET_KEY=secret, **settings)

    def spawn(self, kind: str, script: str, args: list[str], env: dict[str, str]) -> Proc:
        argv = [
            sys.executable,
            str(REPO / script),
            *args,
            "--env-file",
            "/dev/null",
        ]
        proc = Proc(self._name(kind), argv, env, self.root, self.logs)
        self.procs.append(proc)
        return proc

    def server(
        self,
        secret: str | None = SECRET,
        *,
        args: list[str] | None = None,
        wait: bool = True,
        **settings: Any,
    ) -> tuple[Proc, int | None]:
        """Start ``remap_server.py --port 0`` and wait for its port file (unless ``wait`` is False)."""
        port_file = self.root / f"port{self._count + 1}"
        proc = self.spawn(
            "server",
            "remap_server.py",
            ["--port", "0", "--port-file", str(port_file), *(args or [])],
            self.env(secret, **settings),
        )
        if not wait:
            return proc, None

        def port() -> int | None:
            if not proc.running():
                pytest.fail(f"server exited with {proc.popen.returncode}:\n{proc.stderr()[-3000:]}")
            text = port_file.read_text() if port_file.exists() else ""
            return int(text) if text.endswith("\n") else None

        return proc, wait_for(port, START_TIMEOUT, "the server's port file")

    def node(
        self, port: int, secret: str | None = SECRET, *, cores: int = 1, **settings: Any
    ) -> Proc:
        return self.spawn(
            "node",
            "remap_node.py",
            ["--server", f"127.0.0.1:{port}", "--cores", str(cores)],
            self.env(secret, **settings),
        )

    def console(
        self,
        port: int,
        *args: str,
        secret: str | None = SECRET,
        timeout: float = 60.0,
        **settings: Any,
    ) -> subprocess.CompletedProcess:
        argv = [
            sys.executable,
            str(REPO / "remap_console.py"),
            "--server",
            f"127.0.0.1:{port}",
            "--env-file",
            "/dev/null",
            *args,
        ]
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.root,
                env=self.env(secret, **settings),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"console {' '.join(args)} did not finish in {timeout}s: {exc.stderr!r}")

    def wait_node_joined(
        self, server: Proc, count: int = 1, timeout: float = START_TIMEOUT
    ) -> None:
        wait_for(
            lambda: server.stderr().count(" joined: ") >= count, timeout, f"{count} node(s) to join"
        )

    def job_file(self, n: int = 20, mode: str = "object") -> Path:
        """A small job: square 0..n-1."""
        (self.root / "square.py").write_text("def square(x):\n    return x * x\n")
        job = self.root / "job.yaml"
        job.write_text(f"function: square.py:square\nargs_range: [0, {n}]\nresponse_mode: {mode}\n")
        return job

    def run_job(self, port: int, n: int = 20, **settings: Any) -> list[int]:
        """Run the small job through a console process; return its results (asserts success)."""
        job = self.job_file(n)
        done = self.console(port, "compute", str(job), "--json", **settings)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path) as c:
        yield c


# =========================================================================== wire helpers


class Plant:
    """Unpickling this calls open(path, "w"): the file appearing means something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def frame(header: dict, payload: bytes = b"") -> bytes:
    return b"".join(
        bytes(p) for p in encode_frame(msgpack.packb(header, use_bin_type=True), payload)
    )


def drain(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until the peer closes (True) or ``timeout`` passes (False)."""
    sock.settimeout(0.1)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def headers_of(data: bytes) -> list[dict]:
    return [msgpack.unpackb(f.header, raw=False) for f in FrameDecoder(1 << 20).feed(data)]


def error_frames(data: bytes) -> list[dict]:
    return [h for h in headers_of(data) if h.get("t") == "error"]


def hello_bytes(key: bytes, role: str = "node") -> tuple[Connection, bytes]:
    conn = Connection(role, key)
    conn.initiate()
    return conn, b"".join(bytes(p) for p in conn.data_to_send())


class FakeServer(threading.Thread):
    """A tiny in-process 'server' on 127.0.0.1:0 that tries to push a planted pickle to a node.

    ``mode``:
      - "wrong-key": a real server Connection with the wrong secret: challenge (with a proof the
        node cannot verify), then job_load + task carrying the pickle, all in one write;
      - "skip": no challenge at all: welcome + job_load + task straight after the hello;
      - "right-key": the genuine handshake, then job_load + task after the node's node_info (a contrast
        that shows the planted pickle does fire on a node once it trusts the server).
    """

    def __init__(self, key: bytes, mode: str, blob: bytes) -> None:
        super().__init__(daemon=True)
        self.key, self.mode, self.blob = key, mode, blob
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.connections = 0
        self.received: list[bytes] = []
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self.connections += 1
                with sock:
                    try:
                        self._serve(sock)
                    except OSError:
                        pass
        except Exception as exc:  # surfaced by the test through .failures
            self.failures.append(repr(exc))
        finally:
            self.listener.close()

    def _work(self) -> bytes:
        return frame({"t": "job_load", "job": 1}, self.blob) + frame(
            {"t": "task", "task": 1, "job": 1, "sizes": [len(self.blob)]}, self.blob
        )

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.1)
        conn = Connection("server", self.key)
        got = b""
        deadline = time.monotonic() + 10
        sent_work = False
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
            if self.mode == "skip":
                if not sent_work:
                    sock.sendall(
                        frame(
                            {
                                "t": "welcome",
                                "session": "fake",
                                "max_frame": 1 << 24,
                                "heartbeat": 2.0,
                            }
                        )
                        + self._work()
                    )
                    sent_work = True
                continue
            events = conn.receive_data(chunk)
            out = b"".join(bytes(p) for p in conn.data_to_send())
            if self.mode == "wrong-key" and out and not sent_work:
                out += self._work()
                sent_work = True
            if self.mode == "right-key":
                for event in events:
                    if (
                        hasattr(event, "message")
                        and isinstance(event.message, m.NodeInfo)
                        and not sent_work
                    ):
                        conn.send(m.JobLoad(job=1, payload=self.blob))
                        conn.send(m.Task(task=1, job=1, sizes=[len(self.blob)], payload=self.blob))
                        out += b"".join(bytes(p) for p in conn.data_to_send())
                        sent_work = True
            if out:
                sock.sendall(out)
        self.received.append(got)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


# =========================================================================== the right secret works


def test_right_secret_node_and_console_work(cluster):
    """With the same secret everywhere a node joins, status shows it, and a job returns right results."""
    server, port = cluster.server()
    cluster.node(port)
    cluster.wait_node_joined(server)
    status = cluster.console(port, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert len(data["nodes"]) == 1
    assert cluster.run_job(port, 20) == [i * i for i in range(20)]


def test_server_binds_loopback_by_default_and_makes_a_private_secret(cluster):
    """No --host: the socket listens on 127.0.0.1 only; with no secret a 0600 ~/.remap/secret is made
    and a console of the same user (same HOME, no REMAP_SECRET_KEY) authenticates with it."""
    server, port = cluster.server(secret=None)
    assert f"listening on 127.0.0.1:{port}" in server.stderr()
    assert listening_addresses(port) == {"127.0.0.1"}
    secret_file = cluster.home / ".remap" / "secret"
    assert secret_file.exists()
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert (secret_file.parent.stat().st_mode & 0o777) == 0o700
    status = cluster.console(port, "status", secret=None)
    assert status.returncode == 0, status.stderr
    other_home = cluster.root / "stranger"
    other_home.mkdir()
    stranger = subprocess.run(
        [
            sys.executable,
            str(REPO / "remap_console.py"),
            "--server",
            f"127.0.0.1:{port}",
            "--env-file",
            "/dev/null",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(other_home),
        stdin=subprocess.DEVNULL,
    )
    assert stranger.returncode == 2
    assert "no secret configured" in stranger.stderr and "REMAP_SECRET_KEY" in stranger.stderr


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, read from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            address, port_hex = parts[1].split(":")
            if parts[3] == "0A" and int(port_hex, 16) == port:
                if width == 8:
                    found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
                else:
                    found.add(address)
    return found


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_public_bind_without_a_secret_is_refused(cluster, host):
    """--host on a non-loopback address with no REMAP_SECRET_KEY exits non-zero, says how to set one,
    and never listens (no port file is written)."""
    (cluster.home / ".remap").mkdir(mode=0o700)
    (cluster.home / ".remap" / "secret").write_text("a-private-loopback-secret\n")  # does not count
    proc, _ = cluster.server(secret=None, args=["--host", host], wait=False)
    code = proc.wait(START_TIMEOUT)
    err = proc.stderr()
    assert code != 0
    assert "REMAP_SECRET_KEY" in err and "secrets.token_urlsafe" in err
    assert "Traceback" not in err
    assert not any(cluster.root.glob("port*")), "the server must not have listened"


# =========================================================================== the wrong secret is refused


def test_console_with_the_wrong_secret_exits_3_with_one_line(cluster):
    """A console with the wrong secret exits 3 with a single clear line about the secret, no traceback."""
    _server, port = cluster.server()
    done = cluster.console(port, "status", secret=WRONG)
    assert done.returncode == 3
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "REMAP_SECRET_KEY" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stdout == ""


def test_node_with_the_wrong_secret_exits_nonzero_naming_the_secret(cluster):
    """A node with the wrong secret stops (does not retry forever) with a line mentioning the secret;
    the server keeps no node."""
    server, port = cluster.server()
    node = cluster.node(port, secret=WRONG)
    code = node.wait(START_TIMEOUT)
    assert code == 3
    last = node.stderr().strip().splitlines()[-1]  # the error ends the output (no log after it)
    assert last.startswith("error:") and "REMAP_SECRET_KEY" in last, node.stderr()
    status = cluster.console(port, "status", "--json")
    assert json.loads(status.stdout)["nodes"] == []
    assert " joined: " not in server.stderr()


@pytest.mark.parametrize("mode", ["wrong-key", "skip"])
def test_node_refuses_work_from_a_server_without_the_secret(cluster, mode):
    """A fake server that lacks the secret (or skips the challenge) pushes a pickled function at a
    node: the node refuses and never unpickles it (the marker file is never created)."""
    marker = cluster.root / "node-unpickled-it"
    fake = FakeServer(WRONG.encode(), mode, pickle.dumps(Plant(marker)))
    fake.start()
    try:
        node = cluster.node(fake.port)
        if mode == "wrong-key":
            code = node.wait(START_TIMEOUT)
            assert code == 3
            assert "secret" in node.stderr().lower()
        else:
            # a protocol violation is not a credential problem: the node drops it and reconnects
            wait_for(lambda: fake.connections >= 2, START_TIMEOUT, "the node to reconnect")
            node.stop()
        wait_for(lambda: fake.received, 30, "the fake server to finish with the first connection")
        sent_back = [h for h in headers_of(fake.received[0])]
        assert [h["t"] for h in sent_back] == ["hello", "error"], sent_back
        assert sent_back[1]["code"] == ("auth" if mode == "wrong-key" else "bad-frame")
    finally:
        fake.stop()
    assert fake.failures == []
    assert not marker.exists()


def test_a_server_without_the_secret_learns_no_versions_from_a_node_or_console(cluster):
    """A fake server on loopback (without the secret) captures everything a real node and a real
    console send it before they refuse its proof: their hellos name the protocol version and the
    role, and no Python, cloudpickle or remap version, nor the node's host name (before, every
    hello said the first two, and a node's its host name, to any server it dialled)."""
    import cloudpickle

    import remap

    fake = FakeServer(WRONG.encode(), "wrong-key", b"")
    fake.start()
    try:
        node = cluster.node(fake.port, REMAP_NODE_NAME="node-name-4711")
        assert node.wait(START_TIMEOUT) == 3
        console = cluster.console(fake.port, "status")
        assert console.returncode == 3, console.stderr
        wait_for(lambda: len(fake.received) == 2, 30, "both connections to end")
    finally:
        fake.stop()
    assert fake.failures == []
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    secret = [py, ".".join(cloudpickle.__version__.split(".")[:2]), remap.__version__]
    secret += ["node-name-4711", "python", "cloudpickle"]
    secret += [socket.gethostname()] if len(socket.gethostname()) > 3 else []  # (not "vm")
    for got in fake.received:
        hello, error = headers_of(got)
        assert set(hello) == {"t", "version", "role", "nonce"} and error["t"] == "error"
        told = got.replace(hello["nonce"], b"")  # (random bytes could hold any 3 characters)
        assert [s for s in secret if s.encode() in told] == [], got


def test_fake_server_with_the_right_key_does_get_its_pickle_run(cluster):
    """Contrast: once the server proves the secret, the node loads its function (the marker appears).

    So the refusals above are the handshake at work, not a marker that could never fire.
    """
    marker = cluster.root / "node-unpickled-it"
    fake = FakeServer(SECRET.encode(), "right-key", pickle.dumps(Plant(marker)))
    fake.start()
    try:
        cluster.node(fake.port)
        wait_for(marker.exists, START_TIMEOUT, "the node's core to unpickle the function")
    finally:
        fake.stop()


def test_planted_pickles_to_a_real_server_port_are_never_unpickled(cluster):
    """Pre-auth frames carrying a planted pickle (submit, args, job_load, result, task) are refused by a
    real server, which never unpickles them and goes on serving."""
    marker = cluster.root / "server-unpickled-it"
    blob = pickle.dumps(Plant(marker))
    server, port = cluster.server()
    cluster.node(port)
    attempts = [
        frame({"t": "submit", "id": 1, "name": "evil", "mode": "reduce"}, blob),
        frame({"t": "args", "job": 1, "start": 0, "sizes": [len(blob)]}, blob),
        frame({"t": "job_load", "job": 1}, blob),
        frame({"t": "result", "task": 1, "sizes": [len(blob)]}, blob),
        frame({"t": "task", "task": 1, "job": 1, "sizes": [len(blob)]}, blob),
    ]
    for with_hello in (False, True):
        for data in attempts:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                conn, hello = hello_bytes(SECRET.encode(), "console")
                sock.sendall((hello if with_hello else b"") + data)
                got, closed = drain(sock, 10)
                assert closed, "the server must close a connection that sends work before auth"
                if with_hello:  # the challenge, then the error, sealed as all after it
                    events = conn.receive_data(got)
                    assert [type(e) for e in events] == [ConnectionFailed], events
                else:
                    assert error_frames(got), got
    cluster.wait_node_joined(server)
    assert cluster.run_job(port, 10) == [i * i for i in range(10)]
    assert not marker.exists()


class Relay(threading.Thread):
    """A machine on the path (as ARP spoofing makes one on a LAN), on 127.0.0.1:0: passes each
    connection's bytes between a client and the server at ``port`` unchanged, and once the
    server's first two frames (the challenge and the welcome) went by puts ``inject`` into the
    stream toward the client, once (``injected`` is set then)."""

    def __init__(self, port: int, inject: bytes) -> None:
        super().__init__(daemon=True)
        self.server_port, self.inject = port, inject
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.injected = threading.Event()
        self.connections = 0

    def run(self) -> None:
        with self.listener:
            while not self.stopping.is_set():
                try:
                    client, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self.connections += 1
                try:
                    with client, socket.create_connection(("127.0.0.1", self.server_port)) as up:
                        self._relay(client, up)
                except OSError:
                    pass

    def _relay(self, client: socket.socket, up: socket.socket) -> None:
        from_server = FrameDecoder(1 << 30)
        passed = 0
        while not self.stopping.is_set():
            for sock in select.select([client, up], [], [], 0.1)[0]:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is client:
                    up.sendall(data)
                    continue
                out = b""
                for f in from_server.feed(data):  # whole frames, so one can go in between
                    out += b"".join(bytes(p) for p in encode_frame(f.header, f.payload))
                    passed += 1
                    if passed == 2 and not self.injected.is_set():
                        out += self.inject
                        self.injected.set()
                client.sendall(out)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def test_frames_injected_after_a_relayed_handshake_are_refused_unread(cluster):
    """A machine on the path passes a node's handshake with the real server through, then
    puts a ``job_load`` and a ``task`` carrying a planted pickle into the stream toward the
    node (no TLS): the first frame fails the node's MAC check, the node says so in one line
    and closes, and nothing of it is unpickled; the node reconnects and runs a job."""
    marker = cluster.root / "node-unpickled-it"
    blob = pickle.dumps(Plant(marker))
    server, port = cluster.server()
    work = frame({"t": "job_load", "job": 1}, blob)
    work += frame({"t": "task", "task": 1, "job": 1, "sizes": [len(blob)]}, blob)
    relay = Relay(port, work)
    relay.start()
    try:
        node = cluster.node(relay.port)
        wait_for(relay.injected.is_set, START_TIMEOUT, "the relay to inject its frames")
        wait_for(lambda: relay.connections >= 2, START_TIMEOUT, "the node to reconnect")
        assert cluster.run_job(port, 5) == [i * i for i in range(5)]  # on the node, relayed
    finally:
        relay.stop()
    said = (
        f"closing connection to 127.0.0.1:{relay.port}: frame 1 from the peer failed its integrity"
    )
    assert node.stderr().count(said) == 1, node.stderr()[-3000:]
    assert not marker.exists()


# =========================================================================== garbage on the server port


def test_garbage_and_oversized_frames_leave_the_server_serving(cluster):
    """Random bytes, a 2**31-byte frame and a half handshake left silent are each dropped (the last one
    at the handshake deadline); the node and console keep working, and a job runs to completion."""
    server, port = cluster.server(REMAP_HANDSHAKE_TIMEOUT="0.5")
    cluster.node(port)
    cluster.wait_node_joined(server)

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(os.urandom(4096))
        _got, closed = drain(sock, 10)
        assert closed, "random bytes must get the connection closed"

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack(">II", 2**31, 10) + b"x" * 100)
        got, closed = drain(sock, 10)
        assert closed
        assert [e["code"] for e in error_frames(got)] == ["frame-too-large"]

    # the clock starts before the connection exists, so the server's 0.5 s deadline (armed
    # once it has accepted) cannot end before it: the lower bound holds however late this
    # process runs (started after connecting, a stall of 0.2 s before reading the clock would fail
    # '>= 0.3'). The upper one only tells the configured 0.5 s from the 5 s default (which now
    # waits 5 s or more on this clock), so only a 4.5 s stall fails a correct server
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn, hello = hello_bytes(SECRET.encode())
        sock.sendall(hello)
        got, closed = drain(sock, 30)
        waited = time.monotonic() - started
        assert closed, "a silent half handshake must be dropped at the deadline"
        assert 0.45 <= waited < 5, waited
        # the challenge, then the timeout sealed under the server's MAC, as all after it
        events = conn.receive_data(got)
        assert [type(e) for e in events] == [ConnectionFailed]
        assert isinstance(events[0].error, HandshakeTimeout), events

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(hello_bytes(SECRET.encode())[1][:10])  # a truncated hello, then silence
        _got, closed = drain(sock, 10)
        assert closed

    assert server.running()
    status = cluster.console(port, "status", "--json")
    assert len(json.loads(status.stdout)["nodes"]) == 1
    assert cluster.run_job(port, 30) == [i * i for i in range(30)]


# =========================================================================== connection caps


def idle_from(source: str, port: int) -> socket.socket:
    """A connection to the cluster port from ``source`` (a loopback address) that says nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def hello_from(source: str, port: int) -> tuple[bytes, bool]:
    """:func:`answered_hello` on a new connection from ``source`` (closed at once, if connect()
    itself saw the server's reset)."""
    try:
        sock = idle_from(source, port)
    except ConnectionResetError:
        return b"", True
    with sock:
        return answered_hello(sock)


def refused_from(source: str, port: int) -> list[dict]:
    """Say hello from ``source``; the frames the server sent before it closed (a refusal: one
    ``busy`` error frame and the close, within 10 s)."""
    with idle_from(source, port) as sock:
        try:
            sock.sendall(hello_bytes(SECRET.encode())[1])
        except OSError:  # already closed under us
            pass
        data, closed = drain(sock, 10)
    assert closed, f"not closed: {data!r}"
    return headers_of(data)


def answered_hello(sock: socket.socket) -> tuple[bytes, bool]:
    """Send a hello; what came back (a challenge if the server read it) and whether it closed.
    Returns at the first bytes or the close, or after 10 s."""
    try:
        sock.sendall(hello_bytes(SECRET.encode())[1])
    except OSError:  # already closed under us: nothing was read
        return b"", True
    sock.settimeout(10)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return b"", True
    return data, data == b""


def test_idle_sockets_beyond_the_handshake_caps_are_closed_and_a_console_still_runs(cluster):
    """Idle connections that never finish the handshake are capped: from one address 16 wait
    and the 17th is closed at once, unread (its hello gets no challenge, only one ``busy``
    error frame saying why); while they wait a console from another address runs a job. With
    32 waiting from addresses that never authenticated, a 33rd from a fifth is refused too (the
    other half of the slots is kept for addresses that authenticated before), and consoles from
    127.0.0.1, where the node and consoles came from, still run jobs; with 16 idle from 127.0.0.1
    as well a console there exits 4 with one line saying the server refused it (it said "closed
    the connection during the handshake ... if the server uses TLS ..."); one log line says so for
    every refusal, and the joined node keeps its place; once one address's sockets close,
    another gets in (the handshake deadline is 60 s here: the slots freed because the sockets
    closed)."""
    server, port = cluster.server(REMAP_HANDSHAKE_TIMEOUT="60")
    cluster.node(port)
    cluster.wait_node_joined(server)
    held: dict[str, list[socket.socket]] = {}
    busy = "too many connections{} in the handshake (at most {})"
    try:
        held["127.0.0.2"] = [idle_from("127.0.0.2", port) for _ in range(16)]
        assert refused_from("127.0.0.2", port) == [
            {"t": "error", "code": "busy", "message": busy.format(" from this host", 16)}
        ]
        assert cluster.run_job(port, 10) == [i * i for i in range(10)]

        held["127.0.0.3"] = [idle_from("127.0.0.3", port) for _ in range(16)]
        new = busy.format(" from addresses new to this server", 32)
        for source in ("127.0.0.4", "127.0.0.5"):
            assert refused_from(source, port) == [{"t": "error", "code": "busy", "message": new}]
        assert cluster.run_job(port, 10) == [i * i for i in range(10)]

        held["127.0.0.1"] = [idle_from("127.0.0.1", port) for _ in range(16)]
        refused = cluster.console(port, "status")
        # CI under load twice saw a plain close here: the console's write found the reset before
        # it read the busy frame (wire.hear_out; test_closing.py). The server's whole log goes to
        # the captured stdout (an assertion message is cut short), shown when the test fails
        print("console:", refused, "\nserver log:\n" + server.stderr())
        assert refused.returncode == 4 and refused.stdout == ""
        assert refused.stderr.strip().splitlines() == [
            f"error: the server at 127.0.0.1:{port} refused the connection: "
            f"{busy.format(' from this host', 16)}; try again in a moment"
        ]
        # a waiting socket is still served: its hello gets the server's challenge
        got, closed = answered_hello(held["127.0.0.3"][-1])
        assert got and not closed
        assert headers_of(got)[0]["t"] == "challenge"
        wait_for(lambda: "refused 1 connection(s) to the cluster port" in server.stderr(),
                 10, "the refusal's log line")  # fmt: skip
        assert server.stderr().count("connection(s) to the cluster port") == 1

        for source in ("127.0.0.1", "127.0.0.2"):
            for sock in held.pop(source):
                sock.close()

        def admitted(source: str) -> bool:  # a probe that gets a challenge: the closes were seen
            got = hello_from(source, port)[0]
            return bool(got) and headers_of(got)[0]["t"] == "challenge"

        wait_for(lambda: admitted("127.0.0.1") and admitted("127.0.0.7"), 10,
                 "the closed sockets' slots to be free")  # fmt: skip
        assert cluster.run_job(port, 10) == [i * i for i in range(10)]
        status = cluster.console(port, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert len(json.loads(status.stdout)["nodes"]) == 1
        assert server.running()
    finally:
        for socks in held.values():
            for sock in socks:
                sock.close()


def authenticate_from(source: str, port: int) -> socket.socket:
    """A node's connection from ``source`` through the whole handshake: its open socket."""
    sock = idle_from(source, port)
    client, hello = hello_bytes(SECRET.encode())
    sock.sendall(hello)
    while client.state.value == "handshake":
        got = sock.recv(65536)
        assert got, "closed during the handshake"
        events = client.receive_data(got)
        sock.sendall(b"".join(bytes(p) for p in client.data_to_send()))
    assert client.state.value == "open", events
    return sock


def test_a_restarted_server_keeps_slots_for_the_addresses_that_authenticated(cluster):
    """The table of addresses that authenticated outlives a restart (in REMAP_STATE_DIR): after
    one, a node's address that authenticated in the server's earlier life still gets one of the
    reserved slots while strangers hold every other one (without the file the table started
    empty and the node was refused as new). A corrupt file there is ignored, said in one line,
    and the server serves."""
    state = cluster.root / "state"
    state.mkdir(mode=0o700)
    kept = state / "trusted-sources.json"
    kept.write_bytes(b'{"sources": ["127.0.0.9", "not an address"]}\n')
    kept.chmod(0o600)
    caps = {"REMAP_STATE_DIR": state, "REMAP_MAX_HANDSHAKING": "4", "REMAP_HANDSHAKE_TIMEOUT": "60"}
    server, port = cluster.server(**caps)
    authenticate_from("127.0.0.2", port).close()
    assert server.stderr().count(f"ignoring {kept}") == 1, server.stderr()
    server.stop()  # (SIGTERM: the table is saved at the stop, as a few seconds after a change)
    assert json.loads(kept.read_text()) == {"sources": ["127.0.0.2"]}
    assert kept.stat().st_mode & 0o777 == 0o600

    server, port = cluster.server(**caps)
    held = [idle_from("127.0.0.10", port), idle_from("127.0.0.11", port)]
    try:
        new = "too many connections from addresses new to this server in the handshake (at most 2)"
        assert refused_from("127.0.0.12", port) == [{"t": "error", "code": "busy", "message": new}]
        authenticate_from("127.0.0.2", port).close()
    finally:
        for sock in held:
            sock.close()
    assert "ignoring" not in server.stderr()
