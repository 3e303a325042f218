"""A LAN cluster on real separate network stacks: each process in a network namespace of its own.

A server, three nodes and a console, each in its own namespace on one bridge (``tests/netns.py``;
private addresses in 10.213.77.0/24 that exist only inside those namespaces), and a second
server with another secret on the same bridge. Nodes and the console find their server by
discovery alone; a job completes exactly once per argument while one node's cable is cut and
plugged back, and again with 100 ms delay and 2% loss on another node's link. Root only (CI
runs as root); skipped with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_harness import (
    _PREEXEC,
    CONSOLE_SCRIPT,
    NODE_SCRIPT,
    PYTHON,
    SERVER_SCRIPT,
    clean_env,
    wait_for,
)
from tests.netns import Host, Lab, why_not

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

SECRET = "lan-test-secret-of-this-cluster"
OTHER_SECRET = "the-neighbours-cluster-secret"
#: a cut node is declared lost within HEARTBEAT × MISSES seconds (plus a tick); not tighter:
#: on a loaded 2-core machine a console can be starved of CPU for over a second
HEARTBEAT = 1.0
MISSES = 4

WORK = "import time\n\n\ndef slow_square(x):\n    time.sleep(0.004)\n    return x * x\n"


class Net:
    """The lab and the processes started in it; ``close`` kills them all and removes the lab."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

        #: settings every process of this cluster gets (TLS files, say)
        self.common: dict[str, str] = {}

    def env(self, secret: str, **extra: str) -> dict[str, str]:
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        return clean_env(
            home,
            {
                "REMAP_SECRET_KEY": secret,
                "REMAP_DISCOVERY": "on",
                # a browse ends once a match settles (0.5 s): the bound only costs time when
                # nothing answers, and multicast on a loaded machine may take seconds
                "REMAP_DISCOVERY_TIMEOUT": "30",
                "REMAP_HEARTBEAT_INTERVAL": str(HEARTBEAT),
                "REMAP_HEARTBEAT_MISSES": str(MISSES),
                **self.common,
                **extra,
            },
        )

    def start(self, name: str, host: Host, argv: list[str], env: dict[str, str]) -> None:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self.lab.argv(host, [PYTHON, *argv]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        self.procs[name] = (proc, log)

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{self.log(name)[-3000:]}" for name in self.procs)

    def console(
        self, host: Host, *args: str, server: str | None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        argv = [CONSOLE_SCRIPT, "--env-file", "/dev/null"]
        argv += ["--server", server] if server else []
        done = subprocess.run(
            self.lab.argv(host, [PYTHON, *argv, *args]),
            capture_output=True,
            text=True,
            env=self.env(SECRET),
            cwd=self.tmp,
            timeout=timeout,
        )
        return done

    def status(self, host: Host, server: str) -> dict[str, Any]:
        done = self.console(host, "status", "--json", server=server, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def close(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)
        self.lab.close()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    reason = why_not()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    lab = Lab()
    try:
        lab.start()
        made = Net(lab, tmp_path)
        yield made
    finally:  # namespaces (and with them every interface) go, whatever happened
        if "made" in locals():
            made.close()
        else:
            lab.close()


def _stream(stdout: str) -> Counter[int]:
    return Counter(json.loads(line)["index"] for line in stdout.splitlines() if line.strip())


def _exactly_once(stdout: str, n: int) -> None:
    counts = _stream(stdout)
    assert sorted(counts) == list(range(n)), f"missing {set(range(n)) - set(counts)}"
    assert set(counts.values()) == {1}, {i: c for i, c in counts.items() if c != 1}


def _cluster(net: Net, nodes: int, *, neighbour: bool = False) -> tuple[list[Host], Host, str]:
    """A server (and maybe the neighbours' server), ``nodes`` nodes found by discovery, a
    console host; returns (node hosts, console host, the server's address)."""
    lab = net.lab
    server = lab.add_host("srv")
    other = lab.add_host("other") if neighbour else None
    hosts = [lab.add_host(f"n{i}") for i in range(1, nodes + 1)]
    con = lab.add_host("con")
    net.start("server", server, [SERVER_SCRIPT, "--host", "0.0.0.0"], net.env(SECRET))
    if other is not None:
        # its own state directory: two servers on one journal race to open it ("database is
        # locked"); the labs' hosts share one HOME
        state = str(net.tmp / "other-state")
        net.start("other", other, [SERVER_SCRIPT, "--host", "0.0.0.0"],
                  net.env(OTHER_SECRET, REMAP_STATE_DIR=state))  # fmt: skip
    for name in ("server", "other") if other is not None else ("server",):
        wait_for(lambda n=name: "advertised on the LAN" in net.log(n), 30, f"{name} advertised",
                 net.logs)  # fmt: skip
    for i, host in enumerate(hosts, 1):
        env = net.env(SECRET, REMAP_NODE_NAME=f"n{i}")
        net.start(f"n{i}", host, [NODE_SCRIPT, "--cores", "1"], env)
    address = f"{server.address}:7878"
    wait_for(lambda: len(net.status(con, address)["nodes"]) == nodes, 40, "nodes", net.logs)
    return hosts, con, address


def _job(tmp_path: Path, n: int, extra: str = "") -> Path:
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    (job / "work.py").write_text(WORK)
    path = job / "job.yaml"
    path.write_text(
        f"function: work.py:slow_square\nargs_range: [0, {n}]\nresponse_mode: stream\n"
        f"chunksize: 20\n{extra}"
    )
    return path


def test_discovery_and_a_cut_cable(net: Net, tmp_path: Path) -> None:
    """Nodes and console find their server by discovery alone (the neighbours' server, another
    secret, is seen and ignored); a job survives a cut cable: the node is declared lost within
    the heartbeat bound, rejoins by itself, and every argument is delivered exactly once."""
    nodes, con, address = _cluster(net, 3, neighbour=True)
    other = net.lab.hosts["other"]
    # the server names itself as nodes and consoles name it (the README's line), no
    # '._remap._tcp.local.' tail
    assert f"advertised on the LAN as 'remap {os.uname().nodename} {address}' (" in net.log(
        "server"
    ), net.log("server")
    found = net.console(con, "status", "--json", server=None)
    assert found.returncode == 0, found.stderr + net.logs()
    assert "chose server 'remap " in found.stderr and f"at {address}" in found.stderr
    assert f"{other.address}:7878: another cluster" in found.stderr, found.stderr
    for i in (1, 2, 3):
        text = net.log(f"n{i}")
        assert "discovery: chose server" in text and address in text, text
        assert "ignored server" in text and other.address in text, text

    n = 2000
    job = _job(tmp_path, n)
    # output into files, not pipes: an undrained pipe would stall the console, not the network
    out_path, err_path = tmp_path / "compute.out", tmp_path / "compute.err"
    with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
        console = subprocess.Popen(
            net.lab.argv(con, [PYTHON, CONSOLE_SCRIPT, "--env-file", "/dev/null", "--server",
                               address, "compute", str(job), "--json", "--quiet"]),
            stdout=out_file, stderr=err_file, env=net.env(SECRET),
            cwd=tmp_path, start_new_session=True, preexec_fn=_PREEXEC,
        )  # fmt: skip
    try:

        def n1_worked() -> bool:
            done = {x["host"]: x["tasks_done"] for x in net.status(con, address)["nodes"]}
            return done.get("n1", 0) > 0

        wait_for(n1_worked, 30, "n1 to have done some work", net.logs)
        net.lab.link(nodes[0], up=False)
        wait_for(
            lambda: "(n1) lost" in net.log("server"), MISSES * HEARTBEAT + 3, "n1 lost", net.logs
        )
        net.lab.link(nodes[0], up=True)
        wait_for(
            lambda: "n1" in {x["host"] for x in net.status(con, address)["nodes"]},
            40,
            "n1 to rejoin by itself",
            net.logs,
        )
        console.wait(timeout=90)
    finally:
        if console.poll() is None:
            os.killpg(console.pid, signal.SIGKILL)
            console.wait()
    assert console.returncode == 0, err_path.read_text() + net.logs()
    _exactly_once(out_path.read_text(), n)


def test_tls_and_shipped_modules_and_files_over_the_bridge(net: Net, tmp_path: Path) -> None:
    """With TLS on every side (a throwaway CA naming the server's bridge address), discovery
    still finds the server (its advert says TLS) and a job whose function imports a shipped
    module and reads a shipped file runs on nodes that have neither."""
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("10.213.77.2")
    client_cert = ca.issue_cert("remap-node.example")
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server_cert.cert_chain_pems[0],
        "server.key": server_cert.private_key_pem,
        "client.pem": client_cert.cert_chain_pems[0],
        "client.key": client_cert.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
    net.common = {"REMAP_TLS_CA": str(tmp_path / "ca.pem"),
                  "REMAP_TLS_CERT": str(tmp_path / "client.pem"),
                  "REMAP_TLS_KEY": str(tmp_path / "client.key")}  # fmt: skip
    server_tls = {"REMAP_TLS_CERT": str(tmp_path / "server.pem"),
                  "REMAP_TLS_KEY": str(tmp_path / "server.key")}  # fmt: skip
    lab = net.lab
    server = lab.add_host("srv")
    assert server.address == "10.213.77.2"
    nodes = [lab.add_host("n1"), lab.add_host("n2")]
    con = lab.add_host("con")
    net.start("server", server, [SERVER_SCRIPT, "--host", "0.0.0.0"], net.env(SECRET, **server_tls))
    wait_for(lambda: "advertised on the LAN" in net.log("server"), 30, "advertised", net.logs)
    for i, host in enumerate(nodes, 1):
        net.start(
            f"n{i}", host, [NODE_SCRIPT, "--cores", "1"], net.env(SECRET, REMAP_NODE_NAME=f"n{i}")
        )
    job_dir = tmp_path / "shipped"
    job_dir.mkdir()
    (job_dir / "helper_mod_lan.py").write_text("def add(x):\n    return x + 1000\n")
    (job_dir / "table.txt").write_text("7")
    (job_dir / "use.py").write_text(
        "import helper_mod_lan\n\nimport remap\n\n\ndef f(x):\n"
        "    return helper_mod_lan.add(x) * int(remap.job_file('table.txt').read_text())\n"
    )
    (job_dir / "job.yaml").write_text(
        "function: use.py:f\nargs_range: [0, 300]\nresponse_mode: stream\nchunksize: 10\n"
        "modules: [helper_mod_lan.py]\nfiles: [table.txt]\n"
    )
    wait_for(lambda: len(net.status(con, "10.213.77.2:7878")["nodes"]) == 2, 40, "nodes", net.logs)
    done = net.console(con, "compute", str(job_dir / "job.yaml"), "--json", "--quiet", server=None)
    assert done.returncode == 0, done.stderr + net.logs()
    assert "chose server" in done.stderr
    results = {
        json.loads(line)["index"]: json.loads(line)["result"] for line in done.stdout.splitlines()
    }
    assert results == {x: (x + 1000) * 7 for x in range(300)}
    # the server requires TLS with client certificates: the job ran over TLS or not at all
    for i in (1, 2):
        assert "discovery: chose server" in net.log(f"n{i}"), net.log(f"n{i}")


def test_a_slow_lossy_link(net: Net, tmp_path: Path) -> None:
    """100 ms delay and 2% loss on one node's link: the job still completes exactly once."""
    missing = net.lab.netem_missing()
    if missing:
        pytest.skip(f"tc netem is not available here: {missing}")
    nodes, con, address = _cluster(net, 2)
    net.lab.netem(nodes[1], "delay 100ms loss 2%")
    n = 600
    done = net.console(con, "compute", str(_job(tmp_path, n)), "--json", "--quiet",
                       server=address, timeout=90)  # fmt: skip
    assert done.returncode == 0, done.stderr + net.logs()
    _exactly_once(done.stdout, n)


def test_a_node_with_no_server_to_find_gives_up_with_one_line(net: Net) -> None:
    """No server on the wire: the node says it looks, then exits 4 after the bound with one
    clear line (a service manager restarts it)."""
    alone = net.lab.add_host("alone")
    argv = net.lab.argv(alone, [PYTHON, NODE_SCRIPT, "--cores", "1", "--env-file", "/dev/null"])
    env = net.env(SECRET, REMAP_DISCOVERY_TIMEOUT="1")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 4, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: no server of this cluster found by discovery within 1s (no remap server "
        "answered); pass --server HOST:PORT or set REMAP_SERVER (a server that listens on "
        "127.0.0.1, the default, is not advertised: --server 127.0.0.1:7878 on its machine)"
    ], done.stderr
    assert "Traceback" not in done.stderr


def test_a_job_submitted_over_https_to_a_tls_server_on_every_address(
    net: Net, tmp_path: Path
) -> None:
    """The README's TLS recipe (a certificate naming the server's LAN address only) on a server
    listening on 0.0.0.0 with its HTTP API: a job submitted over HTTPS from another machine
    (through the Airflow provider's HTTP layer) runs and its results come back. Before, the
    console child the server starts for it dialled 127.0.0.1, which the certificate does not
    name: the submit answered 400 'host-name mismatch: ... does not name 127.0.0.1'."""
    import trustme

    from remap.server.http.security import derive_token

    ca = trustme.CA()
    server_cert = ca.issue_cert("10.213.77.2")  # as the README's openssl lines: IP:<LAN>
    client_cert = ca.issue_cert("remap-node.example")
    for name, blob in {
        "ca.pem": ca.cert_pem,
        "server.pem": server_cert.cert_chain_pems[0],
        "server.key": server_cert.private_key_pem,
        "client.pem": client_cert.cert_chain_pems[0],
        "client.key": client_cert.private_key_pem,
    }.items():
        blob.write_to_path(str(tmp_path / name))
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "squares.py").write_text("def square(x):\n    return x * x\n")
    lab = net.lab
    server, node, con = lab.add_host("srv"), lab.add_host("n1"), lab.add_host("con")
    assert server.address == "10.213.77.2"
    net.common = {"REMAP_TLS_CA": str(tmp_path / "ca.pem")}
    net.start(
        "server",
        server,
        [SERVER_SCRIPT, "--host", "0.0.0.0", "--http-port", "7880", "--http-host", "0.0.0.0"],
        net.env(SECRET, REMAP_TLS_CERT=str(tmp_path / "server.pem"),
                REMAP_TLS_KEY=str(tmp_path / "server.key"), REMAP_APPS_DIR=str(apps),
                REMAP_DATA_DIR=str(tmp_path / "data")),
    )  # fmt: skip
    wait_for(lambda: "HTTP API and dashboard on" in net.log("server"), 30, "HTTP", net.logs)
    client = {"REMAP_TLS_CERT": str(tmp_path / "client.pem"),
              "REMAP_TLS_KEY": str(tmp_path / "client.key")}  # fmt: skip
    net.start("n1", node, [NODE_SCRIPT, "--cores", "1"], net.env(SECRET, **client))
    wait_for(lambda: "connected to server" in net.log("n1"), 40, "the node joined", net.logs)
    script = (
        "import json, sys\n"
        "from remap.airflow.api import RemapApi\n"
        "api = RemapApi('https://10.213.77.2:7880', sys.argv[1], ca_file=sys.argv[2])\n"
        "job = api.submit('function: squares.py:square\\nargs_range: [0, 20]\\n')\n"
        "import urllib.request\n"  # the results are JSON lines: read them raw
        "req = urllib.request.Request(api.base_url + job['results'] + '?wait=true',\n"
        "                             headers={'Authorization': 'Bearer ' + api.token})\n"
        "print(urllib.request.urlopen(req, context=api.context, timeout=60).read().decode())\n"
    )
    argv = [PYTHON, "-c", script, derive_token(SECRET.encode()), str(tmp_path / "ca.pem")]
    done = subprocess.run(
        lab.argv(con, argv), capture_output=True, text=True, env=net.env(SECRET), timeout=90
    )
    assert done.returncode == 0, done.stderr + net.logs()
    results = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["result"] for r in results] == [x * x for x in range(20)], done.stdout
