"""The few calls of remap's HTTP API the provider needs, on the standard library only.

Kept free of Airflow so the hook, the trigger and the tests share one HTTP layer (the tests
replace :meth:`RemapApi.request`). Blocking: the trigger runs it on a thread.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

#: job states after which nothing changes
FINAL_STATES = frozenset({"done", "failed", "killed", "cancelled"})


class RemapApiError(Exception):
    """The server answered with an error, or could not be reached; one line saying which."""


class RemapApi:
    """``base_url`` like ``https://host:7880``; ``token`` is ``remap dashboard --token``."""

    def __init__(
        self, base_url: str, token: str, *, ca_file: str | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:  # fmt: skip
        """One call; the decoded JSON answer."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(
            self.base_url + path, data=body, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", "replace").strip()
            raise RemapApiError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:  # not HTTP: which port?
            raise RemapApiError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    def submit(self, job: str | dict[str, Any]) -> dict[str, Any]:
        """Submit a job file given as YAML text or as a dict; ``{"job", "name", "results"}``."""
        if isinstance(job, dict):
            return self.request("POST", "/api/v1/jobs", json.dumps(job).encode())
        return self.request("POST", "/api/v1/jobs", job.encode(), "application/yaml")

    def job(self, job_id: int) -> dict[str, Any]:
        """The job's state and counts (``state``, ``done``, ``failed``, ``message``, ...)."""
        return self.request("GET", f"/api/v1/jobs/{int(job_id)}")

    def kill(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/jobs/{int(job_id)}/kill", b"{}")


def summary(job: dict[str, Any], submitted: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the operator pushes to XCom: id, state, counts and where the results are."""
    return {
        "job": job.get("id"),
        "state": job.get("state"),
        "done": job.get("done", 0),
        "failed": job.get("failed", 0),
        "message": job.get("message", ""),
        "results": (submitted or {}).get("results") or job.get("output"),
    }
