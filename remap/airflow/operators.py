"""Submit a job file to a remap server and wait for it, deferring while it runs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:  # Airflow 3
    from airflow.sdk import BaseOperator
    from airflow.sdk.exceptions import AirflowException
except ImportError:  # Airflow 2
    from airflow.exceptions import AirflowException
    from airflow.models import BaseOperator

from .api import FINAL_STATES, summary
from .hooks import RemapHook
from .triggers import RemapJobTrigger


class RemapJobOperator(BaseOperator):
    """Run a remap job file (a path, YAML text or a dict) and push its summary to XCom.

    The job's functions must be in the server's ``REMAP_APPS_DIR`` (see the README's HTTP
    API). ``deferrable=True`` (the default) frees the worker slot while the job runs; the
    task fails when the job fails or is killed, and ``on_kill`` kills the remote job.
    """

    template_fields: Sequence[str] = ("job",)

    def __init__(
        self,
        *,
        job: str | dict[str, Any],
        remap_conn_id: str = RemapHook.default_conn_name,
        deferrable: bool = True,
        poll_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.remap_conn_id = remap_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.job_id: int | None = None

    def _job_body(self) -> str | dict[str, Any]:
        """A dict or YAML text as given; a short string naming a .yaml/.yml/.json file is read."""
        job = self.job
        if isinstance(job, str) and "\n" not in job and job.endswith((".yaml", ".yml", ".json")):
            return Path(job).read_text()
        return job

    def execute(self, context: Any) -> Any:
        api = RemapHook(self.remap_conn_id).get_conn()
        submitted = api.submit(self._job_body())
        self.job_id = int(submitted["job"])
        self.log.info("remap job %s submitted (%s)", self.job_id, submitted.get("name"))
        if self.deferrable:
            self.defer(
                trigger=RemapJobTrigger(
                    self.job_id, self.remap_conn_id, self.poll_interval, submitted.get("results")
                ),
                method_name="execute_complete",
            )
        while True:
            job = api.job(self.job_id)
            if job.get("state") in FINAL_STATES:
                return self.execute_complete(context, summary(job, submitted))
            time.sleep(self.poll_interval)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """The trigger's event: the summary (pushed to XCom as the return value) or a failure."""
        if event.get("state") != "done":
            raise AirflowException(
                f"remap job {event.get('job')} {event.get('state')}: {event.get('message', '')}"
            )
        return event

    def on_kill(self) -> None:
        if self.job_id is not None:
            RemapHook(self.remap_conn_id).get_conn().kill(self.job_id)
