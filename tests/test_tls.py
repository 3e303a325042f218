"""TLS (remap/net.py): real processes on 127.0.0.1 with a throwaway CA made by trustme at test time.

The server presents REMAP_TLS_CERT/REMAP_TLS_KEY and, with REMAP_TLS_CA set, requires a client
certificate signed by that CA; clients verify the server against their REMAP_TLS_CA. The HMAC
handshake still runs inside TLS. Processes come from the harness in test_security_e2e.py, which
tears them all down whatever happens.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.task import Clock

from remap import runtime
from remap.cluster import start_server
from remap.dial import connect_console
from remap.errors import ConfigError
from remap.net import TLSServerEndpoint, client_endpoint, server_endpoint, tls_enabled
from remap.settings import Settings

from .test_security_e2e import WRONG, Cluster, wait_for

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path

    def server(self) -> dict[str, Any]:
        return {
            "REMAP_TLS_CERT": self.server_cert,
            "REMAP_TLS_KEY": self.server_key,
            "REMAP_TLS_CA": self.ca,
        }

    def client(self) -> dict[str, Any]:
        return {
            "REMAP_TLS_CERT": self.client_cert,
            "REMAP_TLS_KEY": self.client_key,
            "REMAP_TLS_CA": self.ca,
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a second unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("remap-node.example")
    stranger = other.issue_cert("remap-node.example")
    paths = {}
    for name, blob in {
        "ca": ca.cert_pem,
        "other_ca": other.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "other_client_cert": stranger.cert_chain_pems[0],
        "other_client_key": stranger.private_key_pem,
    }.items():
        path = root / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = path
    return Pki(**paths)


@pytest.fixture
def cluster(tmp_path: Path):
    with Cluster(tmp_path) as c:
        yield c


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


# --------------------------------------------------------------------------- endpoints, no sockets


def test_no_tls_settings_means_plain_tcp():
    """Without any TLS setting the endpoints are plain TCP."""
    settings = Settings()
    assert not tls_enabled(settings)
    assert isinstance(server_endpoint(Clock(), settings, "127.0.0.1", 0), TCP4ServerEndpoint)
    assert isinstance(client_endpoint(Clock(), settings, "127.0.0.1", 1), HostnameEndpoint)


def test_tls_settings_give_tls_endpoints(pki):
    """With a certificate configured the server endpoint is SSL and the client endpoint wraps TLS."""
    settings = Settings(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_ca=str(pki.ca)
    )
    assert isinstance(server_endpoint(Clock(), settings, "127.0.0.1", 0), TLSServerEndpoint)
    v6 = server_endpoint(Clock(), settings, "::1", 0)
    assert isinstance(v6, TLSServerEndpoint) and isinstance(v6.inner, TCP6ServerEndpoint)
    client = client_endpoint(Clock(), Settings(tls_ca=str(pki.ca)), "127.0.0.1", 1)
    assert not isinstance(client, HostnameEndpoint)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"tls_ca": "CA"}, "REMAP_TLS_CERT and REMAP_TLS_KEY"),
        ({"tls_cert": "CERT"}, "REMAP_TLS_CERT and REMAP_TLS_KEY"),
        ({"tls_cert": "CERT", "tls_key": "/no/such/key.pem"}, "cannot read key /no/such/key.pem"),
        (
            {"tls_cert": "/no/such/cert.pem", "tls_key": "KEY"},
            "cannot read certificate /no/such/cert.pem",
        ),
        (
            {"tls_cert": "CERT", "tls_key": "KEY", "tls_ca": "/no/such/ca.pem"},
            "cannot read CA certificate",
        ),
    ],
)
def test_server_tls_misconfiguration_is_a_config_error(pki, settings, match):
    """Half a TLS configuration or an unreadable file is one ConfigError naming what is wrong."""
    real = {"CERT": str(pki.server_cert), "KEY": str(pki.server_key), "CA": str(pki.ca)}
    values = {k: real.get(v, v) for k, v in settings.items()}
    with pytest.raises(ConfigError, match=match):
        server_endpoint(Clock(), Settings(**values), "127.0.0.1", 0)


def test_client_tls_unreadable_ca_is_a_config_error():
    """A client pointed at a CA file that does not exist says so."""
    with pytest.raises(ConfigError, match="cannot read CA certificate /no/such/ca.pem"):
        client_endpoint(Clock(), Settings(tls_ca="/no/such/ca.pem"), "127.0.0.1", 1)


# --------------------------------------------------------------------------- real processes


def test_job_runs_over_tls_and_hmac_stays_on(cluster, pki):
    """A TLS server with a CA, a node and a console with CA-signed certificates: the job runs.
    Inside TLS the secret is still checked: a valid certificate with the wrong secret exits 3."""
    server, port = cluster.server(**pki.server())
    cluster.node(port, **pki.client())
    cluster.wait_node_joined(server)
    assert cluster.run_job(port, 25, **pki.client()) == [i * i for i in range(25)]
    wrong = cluster.console(port, "status", secret=WRONG, **pki.client())
    assert wrong.returncode == 3
    assert "REMAP_SECRET_KEY" in one_error_line(wrong.stderr)


def test_client_without_a_certificate_is_refused(cluster, pki):
    """A console trusting the CA but presenting no certificate is refused, with one line saying TLS."""
    server, port = cluster.server(**pki.server())
    done = cluster.console(port, "status", REMAP_TLS_CA=pki.ca)
    assert done.returncode != 0
    line = one_error_line(done.stderr)
    assert "TLS" in line and "certificate" in line
    wait_for(
        lambda: "peer did not return a certificate" in server.stderr(), 5, "the server to log why"
    )


def test_client_with_a_certificate_from_another_ca_is_refused(cluster, pki):
    """A console and a node whose certificates another CA signed are refused; the server keeps serving."""
    server, port = cluster.server(**pki.server())
    stranger = {
        "REMAP_TLS_CERT": pki.other_client_cert,
        "REMAP_TLS_KEY": pki.other_client_key,
        "REMAP_TLS_CA": pki.ca,
    }
    done = cluster.console(port, "status", **stranger)
    assert done.returncode != 0
    assert "TLS" in one_error_line(done.stderr)
    node = cluster.node(port, **stranger)
    wait_for(lambda: node.stderr().count("TLS with") >= 1, 20, "the node to report the TLS failure")
    assert " joined: " not in server.stderr()
    ok = cluster.console(port, "status", **pki.client())
    assert ok.returncode == 0, ok.stderr


def test_client_trusting_another_ca_refuses_the_server(cluster, pki):
    """A console whose REMAP_TLS_CA is a different CA refuses the server's certificate."""
    _server, port = cluster.server(**pki.server())
    done = cluster.console(
        port,
        "status",
        REMAP_TLS_CERT=pki.client_cert,
        REMAP_TLS_KEY=pki.client_key,
        REMAP_TLS_CA=pki.other_ca,
    )
    assert done.returncode != 0
    assert "certificate verify failed" in one_error_line(done.stderr)


def test_plain_client_to_a_tls_server_gets_a_hint(cluster, pki):
    """A console without TLS settings cannot talk to a TLS server and is told to set the TLS variables."""
    _server, port = cluster.server(**pki.server())
    done = cluster.console(port, "status")
    assert done.returncode != 0
    assert "REMAP_TLS_CA" in one_error_line(done.stderr)


def test_tls_server_without_a_ca_accepts_clients_without_certificates(cluster, pki):
    """With no REMAP_TLS_CA on the server, clients need no certificate; they still verify the server
    and still prove the secret."""
    _server, port = cluster.server(REMAP_TLS_CERT=pki.server_cert, REMAP_TLS_KEY=pki.server_key)
    ok = cluster.console(port, "status", REMAP_TLS_CA=pki.ca)
    assert ok.returncode == 0, ok.stderr
    wrong = cluster.console(port, "status", secret=WRONG, REMAP_TLS_CA=pki.ca)
    assert wrong.returncode == 3


def test_a_console_refused_at_the_caps_over_tls_says_why(cluster, pki):
    """A console process refused by a full cap of a TLS server (a silent socket holds the one
    place of its address) exits 4 with the line naming the cap, as without TLS (it said "closed
    the connection during the handshake ... (if the server uses TLS, set REMAP_TLS_CA ...)")."""
    _server, port = cluster.server(
        REMAP_MAX_HANDSHAKING_PER_HOST="1", REMAP_HANDSHAKE_TIMEOUT="60", **pki.server()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10):  # accepted first: FIFO
        done = cluster.console(port, "status", **pki.client())
    assert done.returncode == 4, done.stderr
    assert one_error_line(done.stderr) == (
        f"error: the server at 127.0.0.1:{port} refused the connection: too many connections "
        "from this host in the handshake (at most 1); try again in a moment"
    )


def test_server_with_half_a_tls_configuration_exits_with_one_line(cluster, pki):
    """A server given a CA but no certificate exits 2 with one line naming the missing settings."""
    proc, _ = cluster.server(REMAP_TLS_CA=pki.ca, wait=False)
    assert proc.wait(20) == 2
    lines = proc.stderr().strip().splitlines()  # its own line, not "cannot listen ...: tLS ..."
    assert lines[-1] == "error: TLS on the server needs both REMAP_TLS_CERT and REMAP_TLS_KEY"
    assert "Traceback" not in proc.stderr()


def test_a_console_with_unusable_tls_settings_gets_a_config_error() -> None:
    """A CA file that does not exist, or a certificate without its key, is the console's own
    configuration (exit 2), not "cannot reach the server at ..." (exit 4)."""
    for settings, said in (
        (Settings(tls_ca="/no/such/ca.pem"), "cannot read CA certificate /no/such/ca.pem"),
        (Settings(tls_cert="/no/such/c.pem"), "needs both REMAP_TLS_CERT and REMAP_TLS_KEY"),
    ):
        with pytest.raises(ConfigError, match=said) as raised:
            runtime.run(
                connect_console, runtime.reactor(), settings, "127.0.0.1:1", secret=b"k" * 32,
                timeout=10,
            )  # fmt: skip
        assert "cannot reach" not in str(raised.value)


def test_a_failed_listen_keeps_the_reasons_capitals() -> None:
    """The reason after "cannot listen on ...:" starts lower case unless it is an acronym."""
    from remap.net import cannot_listen

    assert str(cannot_listen("", "h", 1, OSError(98, "Address already in use"))).endswith(
        "h:1: address already in use (another server running? choose another port)"
    )
    assert str(cannot_listen("", "h", 1, ValueError("TLS is off"))).endswith("h:1: TLS is off")


# --------------------------------------------------------------------------- chains, bad files, other reactors


@pytest.fixture(scope="module")
def chained(tmp_path_factory) -> dict[str, Path]:
    """Server and client certificates issued by an intermediate CA; the files hold leaf + chain."""
    root_dir = tmp_path_factory.mktemp("chained")
    root = trustme.CA()
    intermediate = root.create_child_ca()
    files: dict[str, Path] = {}
    for who, identity in (("server", "127.0.0.1"), ("client", "remap-node.example")):
        cert = intermediate.issue_cert(identity)
        files[f"{who}_cert"] = root_dir / f"{who}.pem"
        files[f"{who}_cert"].write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        files[f"{who}_key"] = root_dir / f"{who}.key"
        cert.private_key_pem.write_to_path(str(files[f"{who}_key"]))
    files["ca"] = root_dir / "root.pem"
    root.cert_pem.write_to_path(str(files["ca"]))
    return files


def test_certificates_from_an_intermediate_ca_work(cluster, chained):
    """Leaf + intermediate in REMAP_TLS_CERT, only the root in REMAP_TLS_CA: both sides send their
    chain, so server and client verify each other.

    Regression: only the first certificate of the file was loaded, so the chain never travelled
    and both sides failed with 'unknown ca' / 'certificate verify failed'.
    """
    _server, port = cluster.server(
        REMAP_TLS_CERT=chained["server_cert"],
        REMAP_TLS_KEY=chained["server_key"],
        REMAP_TLS_CA=chained["ca"],
    )
    done = cluster.console(
        port,
        "status",
        REMAP_TLS_CERT=chained["client_cert"],
        REMAP_TLS_KEY=chained["client_key"],
        REMAP_TLS_CA=chained["ca"],
    )
    assert done.returncode == 0, done.stderr


def test_garbage_certificate_and_mismatched_key_are_config_errors(pki, tmp_path):
    """A file with no PEM certificate, or a key that does not belong to the certificate, is one
    ConfigError naming the file (not an OpenSSL traceback)."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"certificate {garbage} holds no PEM certificate"):
        server_endpoint(
            Clock(), Settings(tls_cert=str(garbage), tls_key=str(pki.server_key)), "127.0.0.1", 0
        )
    with pytest.raises(ConfigError, match=f"key {pki.client_key} is not a valid PEM private key"):
        server_endpoint(
            Clock(),
            Settings(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key)),
            "127.0.0.1",
            0,
        )
    with pytest.raises(ConfigError, match="CA certificate .* holds no PEM certificate"):
        client_endpoint(Clock(), Settings(tls_ca=str(garbage)), "127.0.0.1", 1)


def test_client_certificate_without_its_key_is_a_config_error(pki):
    """A client given REMAP_TLS_CERT but no REMAP_TLS_KEY is told both are needed."""
    with pytest.raises(ConfigError, match="REMAP_TLS_CERT and REMAP_TLS_KEY"):
        client_endpoint(
            Clock(), Settings(tls_cert=str(pki.client_cert), tls_ca=str(pki.ca)), "127.0.0.1", 1
        )


def test_tls_on_a_reactor_that_is_not_the_global_one(pki):
    """Server and console over TLS inside the console runtime's own reactor (not Twisted's global one).

    Regression: Twisted's TLS wrappers buffer small writes on the *global* reactor unless given a
    clock, so in the console's runtime the hello never left and every TLS console timed out.
    """
    server_settings = Settings(
        host="127.0.0.1",
        port=0,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_ca=str(pki.ca),
        handshake_timeout=5.0,
    )
    client_settings = Settings(
        tls_cert=str(pki.client_cert), tls_key=str(pki.client_key), tls_ca=str(pki.ca)
    )
    key = b"in-process tls secret"

    async def scenario() -> dict:
        reactor = runtime.reactor()
        server = await start_server(reactor, server_settings, secret=key)
        try:
            client = await connect_console(
                reactor, client_settings, server.address, secret=key, timeout=5
            )
            status = await client.status()
            client.link.close()
            return status
        finally:
            await server.stop()

    status = runtime.run(scenario, timeout=30)
    assert status["nodes"] == [] and "uptime" in status["server"]


@pytest.fixture(scope="module")
def ip_only(tmp_path_factory) -> dict[str, Path]:
    """A CA and a server certificate that names IP:127.0.0.1 only (no DNS name)."""
    root = tmp_path_factory.mktemp("ip-only")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def test_host_name_mismatch_is_named_on_the_client_and_logged_by_the_server(cluster, ip_only):
    """Dialling ``localhost`` when the certificate names only IP:127.0.0.1: the console says it is
    a host-name mismatch for 'localhost' (not "set REMAP_TLS_*", which are set), and the server's
    log shows the connection that failed before its handshake."""
    server, port = cluster.server(REMAP_TLS_CERT=ip_only["cert"], REMAP_TLS_KEY=ip_only["key"])
    done = cluster.console(
        port, "--server", f"localhost:{port}", "status", REMAP_TLS_CA=ip_only["ca"]
    )
    assert done.returncode != 0
    line = one_error_line(done.stderr)
    assert "host-name mismatch" in line and "'localhost'" in line, line
    assert "REMAP_TLS_CA" not in line, line
    wait_for(
        lambda: "closed before the handshake finished" in server.stderr(),
        10,
        "the server to log the failed handshake",
    )
    ok = cluster.console(port, "status", REMAP_TLS_CA=ip_only["ca"])
    assert ok.returncode == 0, ok.stderr


def test_a_node_dialling_a_name_its_server_certificate_lacks_stops_with_one_line(cluster, ip_only):
    """A node told ``--server localhost:PORT`` when the certificate names only IP:127.0.0.1
    cannot succeed by retrying (like a wrong secret): it exits 3 with one line naming the
    host-name mismatch, instead of reconnecting every second forever."""
    _server, port = cluster.server(REMAP_TLS_CERT=ip_only["cert"], REMAP_TLS_KEY=ip_only["key"])
    node = cluster.spawn(
        "node",
        "remap_node.py",
        ["--server", f"localhost:{port}", "--cores", "1"],
        cluster.env(REMAP_TLS_CA=ip_only["ca"]),
    )
    assert node.wait(30) == 3
    errors = [line for line in node.stderr().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "host-name mismatch" in errors[0], node.stderr()
    assert "Traceback" not in node.stderr()
