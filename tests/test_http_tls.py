"""HTTPS: the HTTP face uses the cluster's certificate when TLS is configured."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path

import pytest
import trustme

from remap.console.dashboard import login_link
from remap.settings import Settings
from tests.http_harness import SECRET, Served


def test_https_with_the_cluster_certificate(tmp_path: Path) -> None:
    """With REMAP_TLS_CERT the API speaks HTTPS (no client certificate asked of browsers, even
    with a CA set); `remap dashboard` verifies it against REMAP_TLS_CA; the cookie is Secure;
    plain HTTP gets no answer."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": ca.cert_pem, "cert": cert.cert_chain_pems[0], "key": cert.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    tls = {
        "tls_cert": str(tmp_path / "cert.pem"),
        "tls_key": str(tmp_path / "key.pem"),
        "tls_ca": str(tmp_path / "ca.pem"),
    }
    served = Served(Settings(http_port=0, **tls))
    try:
        assert served.http.url.startswith("https://")
        url = login_link(
            Settings(server="127.0.0.1:7878", http_port=served.port, secret=SECRET.decode(), **tls)
        )
        assert url.startswith(f"https://127.0.0.1:{served.port}/login?token=")
        context = ssl.create_default_context(cafile=tls["tls_ca"])
        conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=context, timeout=10)
        conn.request("GET", url.split(str(served.port), 1)[1])
        reply = conn.getresponse()
        reply.read()
        conn.close()
        assert reply.status == 303
        assert "Secure" in reply.headers["Set-Cookie"]
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain = served.request("GET", "/healthz")
            raise AssertionError(f"plain HTTP answered {plain.status}")
        with pytest.raises(ssl.SSLError):  # a client that does not trust the CA refuses
            conn = http.client.HTTPSConnection(
                "127.0.0.1", served.port, context=ssl.create_default_context(), timeout=10
            )
            conn.request("GET", "/healthz")
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("bound", "named", "dialled"),
    [
        ("0.0.0.0", ["127.0.0.1", "localhost"], "127.0.0.1"),  # loopback named: as before
        ("0.0.0.0", ["localhost"], "127.0.0.1"),
        ("0.0.0.0", ["10.213.99.7", "127.0.0.2"], "127.0.0.2"),  # a local address it names
        ("0.0.0.0", ["remap.example", "localhost"], "127.0.0.1"),
        ("0.0.0.0", ["10.213.99.7"], "127.0.0.1"),  # nothing local named: left as it was
        ("127.0.0.3", ["127.0.0.2"], "127.0.0.3"),  # bound to one address: only it answers
        ("0.0.0.0", None, "127.0.0.1"),  # no TLS
    ],
)
def test_a_console_child_dials_an_address_the_servers_certificate_names(
    tmp_path: Path, bound: str, named: list[str] | None, dialled: str
) -> None:
    """The server's console children (an HTTP job's console, a detached job's driver) check
    the server's certificate like any client: with the README's certificate, which names the
    LAN address nodes dial and not 127.0.0.1, a job submitted over HTTP to a server on 0.0.0.0
    failed 'host-name mismatch: ... does not name 127.0.0.1' (seen on a namespace LAN). They
    dial an address of this machine the certificate names instead (127.0.0.2 stands in for
    the LAN address here: every 127/8 address is local)."""
    from remap.server.drivers import child_dial_host

    tls = {}
    if named is not None:
        cert = trustme.CA().issue_cert(*named)
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        tls = {"tls_cert": str(tmp_path / "cert.pem")}
    assert child_dial_host(Settings(host=bound, **tls)) == dialled
