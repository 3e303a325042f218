"""The OpenAPI 3.0 document, generated from the route table and the schemas below."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Any

from protocol.status import JobStatus, NodeStatus, Record

from ..scheduler.state import JobPhase
from .routes import EVENTS, JSON, NDJSON, PARAMS, ROUTES, STATIC_FILES, Route


def _obj(props: dict[str, Any], *, extra: bool = False, optional: Iterable[str] = ()) -> dict:
    return {
        "type": "object",
        "required": sorted(props.keys() - set(optional)),
        "properties": props,
        "additionalProperties": extra,
    }


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_PLAIN = {int: _INT, float: _NUM, str: _STR, bool: _BOOL}


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


def _schema(tp: Any) -> dict:
    """The OpenAPI schema of a status record field's annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _nullable(_schema(args[0]))
    if typing.get_origin(tp) is list:
        return {"type": "array", "items": _schema(args[0])}
    return _PLAIN.get(tp) or {"type": "object"}


def _record(cls: type[Record], **override: dict) -> dict:
    """The schema of a status record's map, derived from its fields (``override``: a
    field's narrower schema, an enum); fields left out when unknown are not required."""
    hints = typing.get_type_hints(cls)
    props = {name: override.get(name) or _schema(hints[name]) for name, _, _ in cls.WIRE}
    return _obj(props, extra=True, optional=[name for name, _, optional in cls.WIRE if optional])


# clients ignore fields they do not know (a later server may add some)
_NODE = _record(NodeStatus)
_JOB = _record(
    JobStatus,
    state={"type": "string", "enum": ["running", "done", "failed", "killed", "cancelled"]},
    # a function job's: receiving (arguments still arriving), completing (all in, outcomes
    # pending), then its end; a detached data job's: map, reduce...; a vertex job's: superstep N
    phase={
        "type": "string",
        "description": "function jobs: "
        + ", ".join(phase.value for phase in JobPhase)
        + "; detached data jobs: their phase (map, reduce); vertex jobs: superstep N",
    },
)
#: what the HTTP API adds to a job's status map (see views.job_view)
_VIEW = {"expected": _nullable(_INT), "progress": _nullable(_NUM), "eta": _nullable(_NUM)}
_JOB["properties"] |= _VIEW
_JOB["required"] = sorted([*_JOB["required"], *_VIEW])
_ERROR_ITEM = _obj(
    {
        "job": _INT,
        "job_name": _STR,
        "index": _nullable(_INT),
        "type": _STR,
        "message": _STR,
        "time": _NUM,
    }
)

SCHEMAS: dict[str, dict] = {
    "Error": _obj({"error": _STR, "message": _STR}),
    "Health": _obj({"ok": _BOOL}),
    "Object": {"type": "object"},
    "LoginLink": _obj({"url": _STR, "path": _STR, "expires_in": _NUM}),
    "Summary": _obj(
        {
            "nodes": _INT,
            "cores": _INT,
            "cores_busy": _INT,
            "jobs_running": _INT,
            "jobs": _INT,
            "queued": _INT,
            "rate": _NUM,
            "tasks_done": _INT,
            "tasks_failed": _INT,
            "uptime": _NUM,
        }
    ),
    "Node": _NODE,
    "NodeList": _obj({"nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}),
    "Job": _JOB,
    "JobList": _obj({"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}}),
    "JobError": _ERROR_ITEM,
    "JobDetail": {
        **_JOB,
        "required": sorted([*_JOB["required"], "errors"]),
        "properties": {
            **_JOB["properties"],
            "errors": {"type": "array", "items": {"$ref": "#/components/schemas/JobError"}},
            "task_output": {
                "type": "string",
                "description": "a detached data or vertex job's task output (what its map, "
                "reduce or compute functions printed or logged, lines prefixed with node and "
                "core): the last 64 KiB the server keeps; absent for function jobs",
            },
        },
    },
    "JobState": _obj({"job": _INT, "state": _STR}),
    "Submitted": _obj({"job": _INT, "name": _STR, "results": _STR}),
    "JobFile": {
        "type": "object",
        "required": ["function"],
        "description": "A job file (see the README's job file reference) without args_path, "
        "output, detach or kind; functions are FILE.py:NAME or module:NAME in the apps dir",
        "properties": {
            "function": _STR,
            "args": {"type": "array"},
            "args_range": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 3},
            "star": _BOOL,
            "response_mode": {"type": "string", "enum": ["file", "none"]},
            "reduce": _STR,
            "chunksize": {"oneOf": [{"type": "integer", "minimum": 1}, {"enum": ["auto"]}]},
            "retries": {"type": "integer", "minimum": 0},
            "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
            "on_error": {"type": "string", "enum": ["fail", "continue"]},
            "group": _STR,
            "priority": _INT,
            "name": _STR,
        },
    },
    "NodeRef": _obj({"node": _STR, "host": _STR}),
}


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _param_schema(name: str) -> dict:
    if name == "name":  # the static files: the only names there are
        return {"type": "string", "enum": sorted(STATIC_FILES)}
    return {"type": PARAMS.get(name, ("string", str))[0]}


def _param(name: str, where: str, required: bool, schema: dict) -> dict:
    return {"name": name, "in": where, "required": required, "schema": schema}


def _operation(route: Route) -> dict:
    ok: dict[str, Any] = {"description": "OK"}
    if route.schema is not None:
        ok["content"] = {route.media: {"schema": {"$ref": f"#/components/schemas/{route.schema}"}}}
    else:
        ok["content"] = {media: {"schema": {"type": "string"}} for media in route.media.split(",")}
    responses: dict[str, Any] = {"200": ok}
    if route.auth == "login":  # a browser opened the link: a page saying what to do
        responses = {"303": {"description": "Logged in: the session cookie is set"}}
        page = {"text/html": {"schema": _STR}}
        responses["401"] = {"description": "The link was used or expired", "content": page}
    elif route.auth != "none":
        responses["401"] = _error("No valid credentials")
    if route.auth != "none":
        responses["401"]["headers"] = {"WWW-Authenticate": {"schema": _STR}}
    if route.not_found:
        responses["404"] = _error("No such job, node or file")
    if route.method == "POST":
        responses["403"] = _error("A browser session without its CSRF token and JSON body")
    if route.body is not None:
        responses["400"] = _error("The job file is refused (the message says why)")
        responses["403"] = _error("Submitting is off (no REMAP_APPS_DIR), or a CSRF failure")
        responses["413"] = _error("The job file is too large")
        responses["415"] = _error("Not a JSON or YAML body")
    if route.media == NDJSON:
        responses["202"] = _error("The job is still running (its results are not committed yet)")
        responses["409"] = _error("The job failed or was killed (the message says why)")
    if route.media == EVENTS:
        responses["503"] = _error("Too many open event streams")
    responses.setdefault("400", _error("Host not allowed, or a malformed request"))
    op: dict[str, Any] = {
        "operationId": route.handler,
        "summary": route.summary,
        "tags": [route.tag],
        "responses": responses,
    }
    names = [segment[1:-1] for segment in route.segments if segment.startswith("{")]
    params = [_param(name, "path", True, _param_schema(name)) for name in names]
    if route.auth == "login":
        params.append(_param("token", "query", True, _STR))
    if route.media == NDJSON:
        params.append(_param("wait", "query", False, _BOOL))
    if params:
        op["parameters"] = params
    if route.body is not None:
        ref = {"$ref": f"#/components/schemas/{route.body}"}
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}, "application/yaml": {"schema": _STR}},
        }
    if route.auth != "required":  # public, or the one-time token in the query is the credential
        op["security"] = []
    return op


def document() -> dict:
    paths: dict[str, dict] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "remap cluster API",
            "version": "1",
            "description": "The remap server's HTTP API: what the console shows, and its controls.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "remap_session"},
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
