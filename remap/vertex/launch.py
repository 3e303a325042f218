"""Starting a vertex job's worker calls on the cluster (a gang function job); the tests start
them in threads instead (``tests/vertex_reference.py``)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..data.driver import error_text
from .worker import WorkerArgs, run_worker


def _drain(events: queue.Queue) -> list[tuple[str, Any]]:
    """Everything queued so far, without waiting."""
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


class ClusterLaunch:
    """The workers as one gang function job: every call at once on a core of its own, without
    a timeout (a worker runs as long as its job); the driver decides what an error means."""

    def __init__(
        self,
        client: Any,
        args: list[WorkerArgs],
        name: str,
        *,
        group: str | None = None,
        retries: int = 3,
        priority: int = 0,
        bundle: Any = None,
        on_output: Callable[[int, str], None] | None = None,
        wait_for_nodes: float | None = None,
    ) -> None:
        from protocol.options import JobOptions

        from .. import runtime
        from ..blobs import dumps
        from ..bundle import wrap
        from ..client import JobStream
        from ..shipping import function_blob

        params = JobOptions(
            name=name,
            mode="none",
            group=group,
            retries=retries,
            timeout=None,
            on_error="continue",
            priority=priority,
            gang=True,
            wait_for_nodes=wait_for_nodes,
        )
        # with the origins of its functions, so a worker's traceback names the user's file
        program = function_blob(args[0].program) if args else b""
        args = [replace(a, program=program) for a in args]
        blob = function_blob(run_worker)
        if bundle:
            blob = wrap(blob, bundle)
        self._runtime = runtime
        self._client = client
        call_soon = runtime.reactor().callFromThread
        self.run = JobStream(
            blob, params, call_soon=call_soon, total_hint=len(args), on_output=on_output
        )
        assert [a.slot for a in args] == list(range(len(args)))  # argument index == slot
        self.run.start(client).put_many([dumps(a) for a in args])
        self.run.close_input()

    def events(self) -> list[tuple[str, Any]]:
        """The worker calls' results matter only as errors; then the job's end."""
        out: list[tuple[str, Any]] = []
        for event in _drain(self.run.events):
            if event[0] == "items":
                out += [("error", error_text(e.type_name, e.message)) for _, _, e in event[2] if e]
            elif event[0] == "end":
                out.append(("end", event[2]))
        return out

    def wait(self, timeout: float) -> bool:
        """Wait for every worker call to return (after the stop command)."""
        return self.run.finished.wait(timeout)

    def calls(self) -> set[int] | None:
        """The argument indices (slots) of the worker calls the server has in flight now, or
        None if not known: a call the server took back (its node or core lost) is missing."""
        job_id = self.run.job_id
        if job_id is None:
            return None
        jobs = self._runtime.run(self._client.status, timeout=30)["jobs"]
        calls = next((j.get("calls") for j in jobs if j["id"] == job_id), None)
        return None if calls is None else set(calls)

    def kill(self) -> None:
        self.run.kill()
