"""A server factory with its HTTP face on 127.0.0.1 port 0, fake nodes and jobs, and a client.

The reactor is the runtime's (a background thread), so tests make plain blocking HTTP calls.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from typing import Any

from protocol import messages as m
from remap import runtime
from remap.server.http import RunningHttp, start_http
from remap.server.http.security import derive_token
from remap.server.service import RemapServerFactory
from remap.settings import Settings

SECRET = b"http-test-secret-" + b"x" * 16


@dataclass
class FakeLink:
    """A node's or console's link: records what the scheduler sends."""

    sent: list[Any] = field(default_factory=list)
    peer: str = "fake"

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close(self, error: Any = None) -> None:
        pass

    def abort(self) -> None:
        pass


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Served:
    """The running HTTP face plus helpers to populate the scheduler and make requests."""

    def __init__(self, settings: Settings | None = None, tick: float = 1.0) -> None:
        self.reactor = runtime.reactor()
        self.factory = RemapServerFactory(self.reactor, SECRET, max_frame=1 << 20)
        self.settings = settings or Settings(http_port=0)
        self.http: RunningHttp = runtime.run(
            start_http,
            self.reactor,
            self.settings,
            self.factory,
            SECRET,
            tick=tick,
            timeout=10,
        )
        self.port = self.http.port.getHost().port
        self.token = self.settings.http_token or derive_token(SECRET)
        self.host = f"127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> Any:
        return self.factory.scheduler

    def stop(self) -> None:
        runtime.run(self.http.stop, timeout=10)

    def add_node(self, host: str = "box", cores: int = 2) -> str:
        def add() -> str:
            node_id = f"node-{host}"
            info = m.NodeInfo(host=host, pid=100, cores=cores, memory=8 << 30, load=0.5)
            self.scheduler.add_node(node_id, FakeLink(), info)
            return node_id

        return runtime.run(add, timeout=5)

    def add_job(self, name: str = "squares", total: int = 100) -> int:
        def add() -> int:
            msg = m.Submit(id=1, name=name, total=total, payload=b"fn")
            accepted: list = []
            self.scheduler.submit(FakeLink(), msg).addCallback(accepted.append)
            return accepted[0].id

        return runtime.run(add, timeout=5)

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        host: str | None = None,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.host if host is None else host)
            if token is not None:
                conn.putheader("Authorization", f"Bearer {token}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            reply = conn.getresponse()
            data = reply.read() if method != "HEAD" else b""
            return Response(reply.status, reply.headers, data)
        finally:
            conn.close()

    def login(self) -> tuple[str, str]:
        """Log in through a login link: (cookie header value, CSRF token)."""
        link = self.request("POST", "/api/v1/login-links", token=self.token).json()
        reply = self.request("GET", link["path"])
        assert reply.status == 303, reply.body
        cookie = reply.headers["Set-Cookie"].split(";")[0]
        page = self.request("GET", "/", headers={"Cookie": cookie}).body.decode()
        csrf = page.split('name="csrf" content="')[1].split('"')[0]
        return cookie, csrf
