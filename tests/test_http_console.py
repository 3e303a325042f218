"""``remap dashboard``: the console mints a login link through the server's HTTP API."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from remap.console.dashboard import login_link
from remap.console.main import main
from remap.errors import AuthError, ConfigError, ServerUnreachable
from remap.settings import Settings
from tests.http_harness import SECRET, Served


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.stop()


def test_dashboard_prints_a_working_login_link(served: Served) -> None:
    """The link comes from the server, holds a one-time token, and logs a browser in once."""
    settings = Settings(server="127.0.0.1:7878", http_port=served.port, secret=SECRET.decode())
    url = login_link(settings)
    assert url.startswith(f"http://127.0.0.1:{served.port}/login?token=")
    path = url.split(str(served.port), 1)[1]
    assert served.request("GET", path).status == 303
    assert served.request("GET", path).status == 401


def test_dashboard_command_line(
    served: Served, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """`remap --server ... dashboard --http-port N` prints the link and exits 0."""
    monkeypatch.setenv("REMAP_SECRET_KEY", SECRET.decode())
    code = main(
        ["--env-file", "/dev/null", "--server", "127.0.0.1:7878", "dashboard",
         "--http-port", str(served.port)]
    )  # fmt: skip
    assert code == 0
    assert "/login?token=" in capsys.readouterr().out
    code = main(["--env-file", "/dev/null", "dashboard", "--token"])
    assert code == 0 and capsys.readouterr().out.strip() == served.token


def test_dashboard_errors_are_one_line(served: Served) -> None:
    """No server, no HTTP port, a wrong secret, nothing listening: each a clear RemapError."""
    with pytest.raises(ConfigError, match="needs a server"):
        login_link(Settings(http_port=1, secret="x"))
    with pytest.raises(ConfigError, match="REMAP_HTTP_PORT"):
        login_link(Settings(server="127.0.0.1:7878", secret="x"))
    with pytest.raises(AuthError, match="refused our token"):
        login_link(Settings(server="127.0.0.1", http_port=served.port, secret="wrong"))
    served.stop()
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        login_link(Settings(server="127.0.0.1", http_port=served.port, secret="x"))
    served.stop = lambda: None  # already stopped


@contextlib.contextmanager
def not_http() -> Iterator[int]:
    """A port that answers an HTTP request as remap's cluster port does: with a binary frame."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(65536)
                peer.sendall(b"\x00\x00\x00\x1e\x81\xa1t\xa5error garbage\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(10)


def test_dashboard_given_a_port_that_does_not_speak_http_says_so_in_one_line() -> None:
    """``dashboard --http-port 7878`` (the cluster port): what answers is not HTTP. One line
    asks whether that is the HTTP port; it was a traceback ending in BadStatusLine."""
    with not_http() as port, pytest.raises(ServerUnreachable) as refused:
        login_link(Settings(server="127.0.0.1", http_port=port, secret="x"), timeout=10)
    assert str(refused.value) == (
        f"http://127.0.0.1:{port} did not answer as the HTTP API (BadStatusLine): is that the "
        "server's HTTP port (its --http-port), not its cluster port (7878 by default)?"
    )


def test_the_airflow_providers_client_given_a_port_that_is_not_http_fails_in_one_line() -> None:
    """The Airflow connection's port set to the cluster port: the provider's call fails with
    its one-line RemapApiError naming what answered; BadStatusLine escaped it (a traceback)."""
    from remap.airflow.api import RemapApi, RemapApiError

    with not_http() as port, pytest.raises(RemapApiError) as refused:
        RemapApi(f"http://127.0.0.1:{port}", "token", timeout=10).job(1)
    assert str(refused.value).startswith("GET /api/v1/jobs/1: BadStatusLine: "), refused.value


@pytest.mark.slow
def test_embedded_cluster_serves_the_dashboard(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """remap.connect(dashboard=True) on an embedded cluster prints a working login link."""
    import http.client
    from urllib.parse import urlsplit

    import remap

    with remap.connect(cores=1, env_file=None, dashboard=True) as cluster:
        url = urlsplit(cluster.dashboard_url)
        assert url.hostname == "127.0.0.1" and f"remap dashboard: {cluster.dashboard_url}" in (
            capsys.readouterr().err
        )
        assert cluster.map(abs, [-1, -2]) == [1, 2]
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request("GET", f"{url.path}?{url.query}")
        reply = conn.getresponse()
        assert reply.status == 303 and "remap_session=" in reply.headers["Set-Cookie"]
        conn.close()


@pytest.mark.slow
def test_compute_dashboard_prints_the_link(tmp_path) -> None:
    """`compute JOB --dashboard` on the embedded cluster prints a login link on stderr."""
    from tests.cluster_harness import CONSOLE_SCRIPT, jobs_function, run_entry, write_job

    job = write_job(
        tmp_path / "j.yaml", {"function": jobs_function("funcs", "square"), "args": [3]}
    )
    done = run_entry(
        CONSOLE_SCRIPT, "--env-file", "/dev/null", "--cores", "1", "compute", job,
        "--dashboard", "--json", home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[9]"
    assert "dashboard: http://127.0.0.1:" in done.stderr and "/login?token=" in done.stderr


@pytest.mark.slow
def test_compute_dashboard_prints_the_link_for_a_data_job(tmp_path) -> None:
    """`compute DATA_JOB --dashboard` prints the login link too, as for a function job.
    Before, a data or vertex job ignored the flag: no link, no dashboard."""
    from tests.cluster_harness import CONSOLE_SCRIPT, run_entry

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a b a\n")
    (tmp_path / "wc.py").write_text(
        "def map(line):\n    for w in line.split():\n        yield w, 1\n\n\n"
        "def reduce(key, values):\n    yield key, sum(values)\n"
    )
    (tmp_path / "j.yaml").write_text("kind: mapreduce\nmodule: wc.py\ninput: in/\noutput: out/\n")
    done = run_entry(
        CONSOLE_SCRIPT, "--env-file", "/dev/null", "--cores", "1", "compute", "j.yaml",
        "--dashboard", "--json", home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"state": "OK"' in done.stdout
    assert "dashboard: http://127.0.0.1:" in done.stderr and "/login?token=" in done.stderr


@pytest.mark.slow
def test_shell_dashboard_starts_the_embedded_cluster() -> None:
    """In the shell with no server, `dashboard` starts the embedded cluster and serves it."""
    import http.client
    from urllib.parse import urlsplit

    from remap.console.session import Session

    session = Session(Settings(cores=1), embedded_for_requests=True)
    try:
        url = urlsplit(session.dashboard_link())
        assert session.embedded is not None and url.hostname == "127.0.0.1"
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request("GET", f"{url.path}?{url.query}")
        assert conn.getresponse().status == 303
        conn.close()
    finally:
        session.close()
    with pytest.raises(ConfigError, match="needs a server"):  # one-shot: nothing would stay up
        Session(Settings(cores=1)).dashboard_link()


@pytest.mark.slow
def test_an_embedded_clusters_dashboard_stops_with_it() -> None:
    """The embedded cluster's HTTP face is a child service of its server: it answers while the
    handle is open and its port is closed once the handle is."""
    import io
    import socket
    import urllib.parse
    import urllib.request

    import remap

    cluster = remap.connect(cores=1)
    try:
        url = cluster.open_dashboard(out=io.StringIO())
        port = urllib.parse.urlsplit(url).port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        cluster.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.slow
def test_the_command_the_server_prints_for_a_new_link_works(make_cluster) -> None:
    """The server's dashboard line names a console command for a new link; run as printed
    exactly as printed (no --server added), it prints one: it names the server's address and
    HTTP port, which a console cannot know otherwise (a loopback server is not advertised)."""
    import re
    import shlex

    from tests.cluster_harness import NodeSpec

    cluster = make_cluster([NodeSpec(cores=1)], server_env={"REMAP_HTTP_PORT": "0"})
    printed = cluster.wait_for(
        lambda: re.search(r"`remap_console\.py ([^`]*)` prints a new one",
                          cluster.server.log_text()),
        10,
        "the server's dashboard line",
    ).group(1)  # fmt: skip
    done = cluster.console(*shlex.split(printed), server=False)
    assert done.returncode == 0, cluster.explain(done)
    assert "/login?token=" in done.stdout, done.stdout
