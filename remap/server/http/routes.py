"""The one route table: it drives the dispatcher, the OpenAPI document and the auth tests.

A route is authenticated unless it says ``auth="none"`` (only the bare health check does) or
``auth="login"`` (the login link, which carries its own one-time token). Adding a route here
is the only way to serve one, so a route cannot be added without its authentication.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

JSON = "application/json"
HTML = "text/html"
TEXT = "text/plain"
EVENTS = "text/event-stream"
CSS = "text/css"
JS = "text/javascript"
NDJSON = "application/x-ndjson"
#: media types a submitted job file may have
JOB_FILE_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml")

#: files under ``static/`` that may be served, and their media types (nothing else is reachable)
STATIC_FILES = {"dashboard.css": CSS, "dashboard.js": JS}
#: path parameter -> (OpenAPI type, converter)
PARAMS: dict[str, tuple[str, type]] = {"job_id": ("integer", int), "node_id": ("string", str)}
#: methods that change state: a browser session must show its CSRF token and a JSON content type
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # the name of the HttpApp method serving it
    summary: str
    schema: str | None = None  # the 200 response's schema (a name in openapi.SCHEMAS)
    media: str = JSON  # the 200 response's media type(s), comma-separated
    auth: str = "required"  # "required", "login" (one-time token in the query) or "none"
    not_found: bool = False  # may answer 404 (an unknown job, node or file)
    body: str | None = None  # the request body's schema (a name in openapi.SCHEMAS)
    tag: str = "cluster"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/")) if self.path != "/" else ()

    def match(self, parts: tuple[str, ...]) -> dict[str, str] | None:
        """The path parameters when ``parts`` fits this route's path, else None."""
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, parts):
            if want.startswith("{"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "health", "Liveness check; the only route without authentication",
          "Health", auth="none", tag="meta"),
    Route("GET", "/login", "login", "Spend a one-time login token: sets the session cookie and "
          "redirects to the dashboard", media=HTML, auth="login", tag="meta"),
    Route("POST", "/api/v1/login-links", "login_link", "Mint a one-time login link for a browser",
          "LoginLink", tag="meta"),
    Route("GET", "/", "dashboard", "The dashboard page", media=HTML, tag="dashboard"),
    Route("GET", "/static/{name}", "static", "The dashboard's vendored scripts and styles",
          media=f"{CSS},{JS}", not_found=True, tag="dashboard"),
    Route("GET", "/api/v1/openapi.json", "openapi", "This document", "Object", tag="meta"),
    Route("GET", "/api/v1/summary", "summary", "Cluster summary: nodes, cores busy, jobs, rate",
          "Summary"),
    Route("GET", "/api/v1/nodes", "nodes", "Connected nodes", "NodeList"),
    Route("GET", "/api/v1/jobs", "jobs", "Running and recent jobs", "JobList"),
    Route("POST", "/api/v1/jobs", "submit", "Submit a job file (JSON or YAML) whose functions are "
          "in the server's apps directory (REMAP_APPS_DIR)", "Submitted", body="JobFile"),
    Route("GET", "/api/v1/jobs/{job_id}/results", "results", "A job submitted over HTTP: its "
          "results as JSON lines in argument order, once it ended (202 before; ?wait=true waits; "
          "409 if it failed or was killed)",
          media=NDJSON, not_found=True),
    Route("GET", "/api/v1/jobs/{job_id}", "job", "One job with its recent errors", "JobDetail",
          not_found=True),
    Route("POST", "/api/v1/jobs/{job_id}/kill", "kill", "Stop a job's queued and running work "
          "(a detached data or vertex job: answers once its driver has cleaned up and ended)",
          "JobState", not_found=True),
    Route("POST", "/api/v1/nodes/{node_id}/drain", "drain",
          "Let a node finish its in-flight work and take no more", "NodeRef", not_found=True),
    Route("POST", "/api/v1/nodes/{node_id}/undrain", "undrain", "Let a drained node take work "
          "again", "NodeRef", not_found=True),
    Route("GET", "/api/v1/events", "events", "Server-sent events: one snapshot per second",
          media=EVENTS),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", media=TEXT, tag="meta"),
    Route("GET", "/api/v1/debug/scheduler", "scheduler_events", "The scheduler's last events "
          "and commands (oldest first), for debugging", "Object", tag="meta"),
)  # fmt: skip


def split_path(raw: bytes) -> tuple[str, ...] | None:
    """Percent-decoded path segments, or None for a path that is not ASCII."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    text = text.strip("/")
    return tuple(unquote(part) for part in text.split("/")) if text else ()


def find(parts: tuple[str, ...]) -> list[tuple[Route, dict[str, str]]]:
    """Every route whose path fits (one per method)."""
    return [(route, params) for route in ROUTES if (params := route.match(parts)) is not None]
