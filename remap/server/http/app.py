"""The dispatcher: Host check, authentication, CSRF, then the route's handler. One leaf resource.

Order matters: the Host check and authentication come before routing, so without credentials
every path (known or not, any method) answers 401 and reveals nothing; only the health check is
public. Handlers run on the reactor thread and only read the scheduler or call its
non-blocking ``kill``/``drain``.
"""

from __future__ import annotations

import html
import json
from functools import partialmethod
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import openapi, views
from .events import EventHub
from .metrics import ServerStats
from .routes import (
    JOB_FILE_TYPES,
    JSON,
    MUTATING,
    NDJSON,
    PARAMS,
    STATIC_FILES,
    Route,
    find,
    split_path,
)
from .security import LOGIN_TTL, SESSION_COOKIE, HttpAuth, Identity
from .submit import ENDED_WELL, MAX_BODY, SubmitError, Submitter, parse_body, prepare

SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    b"form-action 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
    b"Cache-Control": b"no-store",
}
UNAUTHORIZED_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>remap: log in</title>
</head><body>
<h1>remap dashboard</h1><p>{why} For a new link run <code>{command}</code> on the server's
machine (or look at the server's output) and open the link it prints.</p></body></html>"""


def _static(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


class HttpApp:
    """Everything the HTTP face needs: the scheduler, its stats, credentials and the event hub."""

    log = Logger()

    def __init__(
        self,
        factory: Any,
        auth: HttpAuth,
        stats: ServerStats,
        hub: EventHub,
        submitter: Submitter,
        *,
        tls: bool,
    ) -> None:
        self.submitter = submitter
        self.factory = factory
        self.scheduler = factory.scheduler
        self.auth = auth
        self.stats = stats
        self.hub = hub
        self.tls = tls

    # ------------------------------------------------------------------ dispatch

    def handle(self, request: Any) -> bytes | int:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if not self.auth.host_allowed(request.getHeader(b"host")):
            request.unauthenticated = True  # refused before credentials: no keep-alive either
            return self._error(request, 400, "bad-host", "this Host name is not allowed")
        parts = split_path(request.path)
        found = find(parts) if parts is not None else []
        method = request.method.decode("ascii", "replace")
        for route, params in found:
            if route.auth != "required" and route.method == method:
                return self._call(request, route, params, None)
        identity = self.auth.identify(
            request.getHeader(b"authorization"), request.getCookie(SESSION_COOKIE.encode())
        )
        if identity is None:
            return self._unauthorized(request, found)
        slot = getattr(request.channel, "slot", None)  # (a test's request may have none)
        if slot is not None:
            slot.trust()
        if not found:
            return self._error(request, 404, "not-found", "no such path")
        for route, params in found:
            if route.method == method:
                if method in MUTATING and not self._csrf_ok(request, identity):
                    why = "a browser session must send its X-CSRF-Token and a JSON body"
                    return self._error(request, 403, "csrf", why)
                return self._call(request, route, params, identity)
        request.setHeader(b"Allow", ", ".join(sorted({r.method for r, _ in found})).encode())
        return self._error(request, 405, "method", f"{method} is not allowed here")

    def _csrf_ok(self, request: Any, identity: Identity) -> bool:
        """A program with the bearer token may write; a browser needs a header a form cannot send."""
        return identity.kind == "bearer" or (
            identity.session is not None
            and _media_type(request) == JSON
            and self.auth.csrf_ok(identity.session, request.getHeader(b"x-csrf-token"))
        )

    def _call(
        self, request: Any, route: Route, params: dict[str, str], identity: Identity | None
    ) -> bytes | int:
        converted: dict[str, Any] = {}
        for name, text in params.items():
            try:
                converted[name] = PARAMS.get(name, ("string", str))[1](text)
            except ValueError:
                return self._error(request, 404, "not-found", f"no such {name.split('_')[0]}")
        return getattr(self, route.handler)(request, identity, **converted)

    def _unauthorized(self, request: Any, found: list) -> bytes:
        if any(r.handler == "dashboard" for r, _ in found):
            return self._login_page(request, "This page needs a login link.")
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="remap"')
        return self._error(request, 401, "unauthorized", "log in or send a token")

    def _login_page(self, request: Any, why: str) -> bytes:
        """The 401 page a browser without a session sees: why, and the whole command for a link
        (a console finds no loopback server by itself, nor the HTTP port)."""
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="remap"')
        command = "python remap_console.py"
        if self.submitter.cluster_address is not None:
            command += f" --server {self.submitter.cluster_address}"
        command += f" dashboard --http-port {request.getHost().port}"
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        page = UNAUTHORIZED_PAGE.format(why=html.escape(why), command=html.escape(command))
        return page.encode()

    @staticmethod
    def _body(request: Any, value: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(value).encode()

    def _error(self, request: Any, code: int, error: str, message: str) -> bytes:
        request.setResponseCode(code)
        return self._body(request, {"error": error, "message": message})

    # ------------------------------------------------------------------ handlers (route table)

    def health(self, request: Any, identity: None) -> bytes:
        return self._body(request, {"ok": True})

    def login(self, request: Any, identity: None) -> bytes:
        token = (request.args.get(b"token") or [b""])[0].decode("ascii", "replace")
        spent = self.auth.redeem(token)
        if spent is None:  # a browser opened it: a page that says what to do, not JSON
            minutes = round(LOGIN_TTL / 60)
            why = "This login link was used already or has expired: a link logs in once,"
            return self._login_page(request, f"{why} within {minutes} minutes.")
        cookie, _ = spent
        request.addCookie(
            SESSION_COOKIE.encode(),
            cookie.encode(),
            path=b"/",
            httpOnly=True,
            sameSite="strict",
            secure=self.tls,
        )
        request.setResponseCode(303)
        request.setHeader(b"Location", b"/")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return b'<!doctype html><a href="/">open the dashboard</a>'

    def login_link(self, request: Any, identity: Identity) -> bytes:
        token = self.auth.new_login_token()
        path = f"/login?token={token}"
        host = (request.getHeader(b"host") or b"localhost").decode("ascii", "replace")
        url = f"{'https' if self.tls else 'http'}://{host}{path}"
        return self._body(request, {"url": url, "path": path, "expires_in": LOGIN_TTL})

    def dashboard(self, request: Any, identity: Identity) -> bytes:
        csrf = identity.session.csrf if identity.session is not None else ""
        page = _static("dashboard.html").decode("utf-8").replace("__CSRF__", html.escape(csrf))
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return page.encode("utf-8")

    def static(self, request: Any, identity: Identity, name: str) -> bytes:
        media = STATIC_FILES.get(name)
        if media is None:
            return self._error(request, 404, "not-found", "no such file")
        request.setHeader(b"Content-Type", f"{media}; charset=utf-8".encode())
        return _static(name)

    def openapi(self, request: Any, identity: Identity) -> bytes:
        return self._body(request, openapi.document())

    def summary(self, request: Any, identity: Identity) -> bytes:
        return self._body(
            request, views.summary_view(self.scheduler, self.stats, self.factory.drivers)
        )

    def scheduler_events(self, request: Any, identity: Identity) -> bytes:
        events = [{"time": round(t, 3), "event": e} for t, e in self.scheduler.events.recent()]
        return self._body(request, {"events": events})

    def nodes(self, request: Any, identity: Identity) -> bytes:
        return self._body(request, {"nodes": views.nodes_view(self.scheduler)})

    def jobs(self, request: Any, identity: Identity) -> bytes:
        return self._body(request, {"jobs": views.jobs_view(self.scheduler, self.factory.drivers)})

    def job(self, request: Any, identity: Identity, job_id: int) -> bytes:
        job = self.scheduler.jobs.get(job_id) or self.factory.drivers.jobs.get(job_id)
        if job is None:
            return self._error(request, 404, "not-found", f"no job {job_id}")
        return self._body(request, views.job_detail(self.scheduler, self.stats, job))

    def kill(self, request: Any, identity: Identity, job_id: int) -> bytes | int:
        driven = self.factory.drivers.jobs.get(job_id)
        if driven is not None:
            return self._kill_detached(request, identity, driven)
        job = self.scheduler.kill(job_id, "killed from the HTTP API")
        if job is None:
            return self._error(request, 404, "not-found", f"no job {job_id}")
        self.log.info("job {id} killed over HTTP ({kind})", id=job_id, kind=identity.kind)
        return self._body(request, {"job": job.id, "state": job.state})

    def _kill_detached(self, request: Any, identity: Identity, driven: Any) -> bytes | int:
        """A detached data or vertex job ends as the console's ``kill`` ends it (its driver
        kills its phase, cleans up, writes INCOMPLETE): the answer comes once it has ended."""
        if driven.finished:
            return self._body(request, {"job": driven.id, "state": driven.state})
        self.log.info("job {id} killed over HTTP ({kind})", id=driven.id, kind=identity.kind)
        self.factory.drivers.kill(
            driven, lambda job: self._late(request, 200, {"job": job.id, "state": job.state})
        )
        return NOT_DONE_YET

    def _late(self, request: Any, code: int, value: Any) -> None:
        """Answer a request later with JSON: dropped if its client left meanwhile."""
        request.setResponseCode(code)
        _send(request, self._body(request, value))

    def _node_action(self, request: Any, identity: Identity, node_id: str, action: str) -> bytes:
        node = getattr(self.scheduler, action)(node_id)
        if node is None:
            return self._error(request, 404, "not-found", "no such node (or not unique)")
        self.log.info(
            "node {id} {action}ed over HTTP ({kind})", id=node.id, action=action, kind=identity.kind
        )
        return self._body(request, {"node": node.id, "host": node.host})

    drain = partialmethod(_node_action, action="drain")
    undrain = partialmethod(_node_action, action="undrain")

    def submit(self, request: Any, identity: Identity) -> bytes | int:
        if not self.submitter.enabled:
            return self._error(
                request, 403, "disabled", "submitting jobs over HTTP is off: set REMAP_APPS_DIR"
            )
        media = _media_type(request)
        if media not in JOB_FILE_TYPES:
            return self._error(request, 415, "media-type", "send the job file as JSON or YAML")
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return self._error(request, 413, "too-large", f"a job file is at most {MAX_BODY} bytes")
        try:
            assert self.submitter.apps_dir is not None
            submission = prepare(
                parse_body(body, media), self.submitter.apps_dir, self.submitter.data_dir
            )
        except SubmitError as exc:
            return self._error(request, 400, "bad-job", str(exc))

        def started(job_id: int) -> None:
            self.log.info("job {id} submitted over HTTP ({kind})", id=job_id, kind=identity.kind)
            results = f"/api/v1/jobs/{job_id}/results"
            self._late(request, 201, {"job": job_id, "name": submission.name, "results": results})

        def failed(message: str) -> None:
            self._late(request, 400, {"error": "bad-job", "message": message})

        self.submitter.start(submission, started, failed)
        return NOT_DONE_YET

    def results(self, request: Any, identity: Identity, job_id: int) -> bytes | int:
        submission = self.submitter.by_job.get(job_id)
        if submission is not None:
            return self._results(request, job_id, submission, recalled=False)
        # submitted before the server restarted? the journal has the job (read off the reactor)
        answered = self.scheduler.recall(job_id).addCallback(
            lambda job: self._results(
                request, job_id, self.submitter.recall(job) if job is not None else None
            )
        )
        answered.addCallback(lambda body: _send(request, body))
        answered.addErrback(self._failed_later, request)
        return NOT_DONE_YET

    def _failed_later(self, failure: Failure, request: Any) -> None:
        self.log.failure("answering {uri}", failure, uri=request.uri)
        _send(request, self._error(request, 500, "failed", "server error (see its log)"))

    def _results(
        self, request: Any, job_id: int, submission: Any, recalled: bool = True
    ) -> bytes | int:
        if submission is None:
            driven = self.factory.drivers.jobs.get(job_id)
            if driven is not None:  # a detached data or vertex job writes files, not results
                kind = "data" if driven.kind == "mapreduce" else driven.kind
                where = driven.output or "its output directory"
                why = f"job {job_id} is a {kind} job: it writes files, in {where}, not results"
            else:
                why = f"job {job_id} was not submitted over HTTP (its results went to its console)"
            return self._error(request, 404, "not-found", why)
        wait = (request.args.get(b"wait") or [b""])[0].lower() in (b"1", b"true", b"yes")
        if not submission.ended and (recalled or not wait):
            if recalled:  # its console child is not this run's to watch
                message = (
                    "the job is still running (it was submitted before the server restarted, "
                    "so ?wait=true cannot wait for it): ask again later"
                )
            else:
                message = (
                    "the job is still running: its results appear when it ends (add ?wait=true "
                    "to wait for them)"
                )
            return self._error(request, 202, "not-ready", message)
        if submission.ended:
            self._send_results(request, submission)
        else:
            submission.waiters.append(lambda: self._send_results(request, submission))
        return NOT_DONE_YET

    def _send_results(self, request: Any, submission: Any) -> None:
        """Stream the committed JSON-lines file (empty for response_mode none); a job that failed
        or was killed answers 409 saying so, never an empty 200 a script takes for no results."""
        if request._disconnected or request.finished:
            return
        ended = self._unsuccessful(submission)
        if ended is not None:
            state, message = ended
            _send(request, self._error(request, 409, f"job-{state}", message))
            return
        request.setHeader(b"Content-Type", NDJSON.encode())
        try:
            handle = open(submission.results, "rb")  # noqa: SIM115 - closed when sent
        except FileNotFoundError:
            request.finish()
            return
        # a push producer, paused by a slow peer, that reads a chunk per turn of the injected
        # reactor: Twisted's server-side file senders are pull producers driven by the global
        # reactor's cooperator, which never runs where the HTTP face is on another reactor (the
        # embedded cluster's, the tests'), so such an answer never ended
        reactor = self.submitter.reactor
        turns = Cooperator(lambda: lambda: True, lambda work: reactor.callLater(0, work))
        producer = FileBodyProducer(handle, turns)
        request.registerProducer(producer, True)
        producer.startProducing(request).addCallback(lambda _: _sent(request))

    def _unsuccessful(self, submission: Any) -> tuple[str, str] | None:
        """``(state, why)`` of an ended submission whose job did not end done, else None: the
        scheduler's record says (a job recalled from the journal too), else its console's exit."""
        job = self.scheduler.jobs.get(submission.job_id)
        if job is not None and job.finished:
            if job.state == "done":
                return None
            return job.state, f"job {job.id} {job.state}: {job.message or 'no reason given'}"
        if submission.exit_code is None or submission.exit_code in ENDED_WELL:
            return None
        return "failed", self.submitter.client_error(submission)

    def events(self, request: Any, identity: Identity) -> bytes | int:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"X-Accel-Buffering", b"no")
        if not self.hub.add(request):
            return self._error(request, 503, "busy", "too many open event streams")
        return NOT_DONE_YET

    def metrics(self, request: Any, identity: Identity) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.stats.prometheus_text()


def _sent(request: Any) -> None:
    """A streamed file's end: the answer ends (a connection lost stopped the producer)."""
    if not request._disconnected:
        request.unregisterProducer()
        request.finish()


def _send(request: Any, body: bytes | int) -> None:
    """Write a late answer and end it, unless its client left (or a streamer took it over)."""
    if body is not NOT_DONE_YET and not (request._disconnected or request.finished):
        request.write(body)
        request.finish()


def _media_type(request: Any) -> str:
    raw = request.getHeader(b"content-type") or b""
    return raw.split(b";")[0].strip().lower().decode("ascii", "replace")


class DispatchResource(Resource):
    """The whole site is one leaf: every request goes through :meth:`HttpApp.handle`."""

    isLeaf = True

    def __init__(self, app: HttpApp) -> None:
        super().__init__()
        self.app = app

    def render(self, request: Any) -> bytes | int:
        return self.app.handle(request)
