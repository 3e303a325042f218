"""Waits for a remap job without holding a worker slot: polls the job on the triggerer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from .api import FINAL_STATES, RemapApiError, summary


class RemapJobTrigger(BaseTrigger):
    """Fires once the job is done, failed, killed or cancelled (or cannot be asked about).

    Only the connection id is serialized, never the token: the triggerer reads the
    connection itself. The blocking HTTP call runs on a thread.
    """

    def __init__(
        self, job_id: int, remap_conn_id: str, poll_interval: float = 10.0,
        results: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.job_id = job_id
        self.remap_conn_id = remap_conn_id
        self.poll_interval = poll_interval
        self.results = results

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "remap.airflow.triggers.RemapJobTrigger",
            {
                "job_id": self.job_id,
                "remap_conn_id": self.remap_conn_id,
                "poll_interval": self.poll_interval,
                "results": self.results,
            },
        )

    def _api(self) -> Any:
        from .hooks import RemapHook

        return RemapHook(self.remap_conn_id).get_conn()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            api = await asyncio.to_thread(self._api)
            while True:
                job = await asyncio.to_thread(api.job, self.job_id)
                if job.get("state") in FINAL_STATES:
                    yield TriggerEvent(summary(job, {"results": self.results}))
                    return
                await asyncio.sleep(self.poll_interval)
        except RemapApiError as exc:
            yield TriggerEvent({"job": self.job_id, "state": "error", "message": str(exc)})

    async def on_kill(self) -> None:
        """Kill the remote job when a user kills the deferred task (marks it failed or
        success, clears it). The operator's ``on_kill`` cannot: once the task has deferred no
        worker runs it. Airflow 3.3+ calls this on the triggerer; older releases never do."""
        try:
            api = await asyncio.to_thread(self._api)
            await asyncio.to_thread(api.kill, self.job_id)
        except RemapApiError as exc:  # ended meanwhile, or the server cannot be asked
            self.log.warning("could not kill remap job %s: %s", self.job_id, exc)
        else:
            self.log.info("remap job %s killed", self.job_id)
