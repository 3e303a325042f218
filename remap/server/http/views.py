"""The JSON the API and the event stream show: the console's status records (function jobs,
detached data and vertex jobs), plus progress and ETA."""

from __future__ import annotations

from typing import Any

from protocol.status import JobStatus

from ..drivers import DrivenJob
from .metrics import ServerStats


def job_view(status: JobStatus) -> dict:
    """A job's status map plus progress (0..1) and ETA in seconds when known.

    ``expected`` is the argument count once known, or the console's hint before the last
    argument arrives (a range or a list has one), so progress shows from the start.
    """
    view = status.to_wire()
    total = view["expected"] = status.total
    finished = status.done + status.failed
    view["progress"] = round(finished / total, 4) if total else (1.0 if total == 0 else None)
    if status.detached and status.state == "done":
        view["progress"] = 1.0  # its last report was of its last phase's tasks or superstep
    left = (total - finished) if total is not None else None
    view["eta"] = (
        round(left / status.rate, 1)
        if status.state == "running" and left is not None and status.rate > 0
        else None
    )
    return view


def summary_view(sched: Any, stats: ServerStats, drivers: Any) -> dict:
    now = sched.clock.seconds()
    nodes, running = list(sched.nodes.values()), list(sched.active.values())
    driven = list(drivers.jobs.values())
    # a running detached job's current phase is a function job of its own: one job to the user
    phases = {j.progress.get("sub_job") for j in driven if not j.finished}
    return {
        "nodes": len(nodes),
        "cores": sum(n.cores for n in nodes),
        "cores_busy": sum(min(n.cores, len(n.inflight)) for n in nodes),
        "jobs_running": sum(j.id not in phases for j in running)
        + sum(not j.finished for j in driven),
        "jobs": len(sched.jobs) + len(driven),
        "queued": sum(j.pending_count for j in running),
        "rate": round(sum(j.describe(now).rate for j in running), 1),
        "tasks_done": stats.done_total,
        "tasks_failed": stats.failed_total,
        "uptime": round(now - sched.started_at, 1),
    }


def nodes_view(sched: Any) -> list[dict]:
    now = sched.clock.seconds()
    return [n.describe(now).to_wire() for n in sched.nodes.values()]


def jobs_view(sched: Any, drivers: Any = None) -> list[dict]:
    """Function jobs, then the detached data and vertex jobs of ``drivers`` (kind, phase)."""
    statuses = sched.job_statuses()
    if drivers is not None:
        statuses += drivers.describe(sched.clock.seconds())
    return [job_view(status) for status in statuses]


def job_detail(sched: Any, stats: ServerStats, job: Any) -> dict:
    """A function job (a scheduler's JobState) or a detached job (a DrivenJob) in full."""
    driven = isinstance(job, DrivenJob)
    view = job_view(job.describe(sched.clock.seconds()) if driven else sched.job_statuses([job])[0])
    view["errors"] = list(stats.job_errors.get(job.id, ()))
    if driven:  # what its tasks printed (a function job's go to its console)
        view["task_output"] = job.task_output(0)["task_output"]
    return view


def snapshot(sched: Any, stats: ServerStats, drivers: Any) -> dict:
    """What every dashboard sees each tick (computed once per tick, shared by all viewers)."""
    last = stats.history[-1] if stats.history else (sched.clock.seconds(), 0, 0)
    return {
        "time": round(sched.clock.seconds(), 3),
        "summary": summary_view(sched, stats, drivers),
        "nodes": nodes_view(sched),
        "jobs": jobs_view(sched, drivers),
        "errors": list(stats.errors)[-20:],
        "sample": list(last),
    }
