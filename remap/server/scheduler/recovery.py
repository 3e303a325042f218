"""Restart and repair, a mixin of :class:`~.core.Scheduler`: jobs taken back from the journal,
resumed by their console, or put right after a message handler failed half-way."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from twisted.internet import defer

from protocol import messages as m

from . import policy
from .effects import command
from .segments import Segment, cut
from .state import JobPhase, JobState


class Recovery:
    """How the scheduler recovers jobs (mixed into the scheduler)."""

    @command
    def restore(self, journal: Any) -> None:
        """Take back the jobs ``journal`` recorded (the server restarted), then journal on.

        A finished job comes back (its results stay in the journal for ``attach``). A detached job
        whose arguments are all stored resumes with those whose outcome was not delivered; an
        attached one waits for its console to resume it; any other fails with the reason.
        """
        self.journal = journal
        journal.on_saved = self.results_saved
        top = 0
        for rec in journal.recover(self.keep_finished):
            top = max(top, rec.id)
            job = self._restored(rec)
            self.jobs[job.id] = job
            if job.finished:
                continue
            self.active[job.id] = job
            if not job.options.detach:  # its console holds its arguments and results: it resumes it
                job.waiting = "waiting for its console to reconnect (the server restarted)"
                self._orphan(
                    job,
                    "the server restarted and the console feeding this job did not come back "
                    f"within {self.console_grace:g}s (REMAP_CONSOLE_GRACE): submit it again",
                    "restart-grace",
                )
                continue
            if job.receiving:
                # all the journal knows: the end never reached it (the console had not sent
                # it, or its commit failed or had not happened when the server stopped)
                stored = sum(
                    sum(groups) if groups else len(sizes) for _, sizes, _, groups in rec.args
                )
                why = (
                    f"before its arguments were all in the journal ({stored} stored, their end "
                    "not recorded)"
                )
                self.finish(job, "failed", f"the server restarted {why}: submit it again")
                continue
            job.received = job.total
            for start, sizes, payload, groups in rec.args:
                job.received_bytes += len(payload)
                count = sum(groups) if groups else len(sizes)
                whole = Segment(
                    range(start, start + count), sizes, memoryview(payload), groups=groups or None
                )
                if groups:
                    job.group_max = max(job.group_max, max(groups))
                # runs of indices whose outcome was not delivered
                for delivered, run in itertools.groupby(whole.indices, rec.delivered.__contains__):
                    if not delivered:
                        indices = list(run)
                        self._requeue(
                            job, cut(whole, indices[0] - start, indices[-1] + 1 - start), last=True
                        )
            self.log.info(
                "job {id} ({name}) resumed from the journal: {left} of {total} arguments to run",
                id=job.id,
                name=job.options.name,
                left=job.pending_count,
                total=job.total,
            )
            self._check_capacity(job)
            self._maybe_complete(job)
        self._job_ids = itertools.count(max(self.job_ids_from, top + 1))
        self._prune_finished()
        self.pump()

    def _restored(self, rec: Any) -> JobState:
        """The job a journal record describes (finished, or running with no queue yet)."""
        job = self._new_job(rec.id, None, rec.submit, rec.submitted_at)
        job.next_seq, job.done, job.failed = rec.next_seq, rec.done, rec.failed
        job.owner = rec.owner
        job.first_window = False
        if rec.args_total is not None:
            job.rebuilt(JobPhase.COMPLETING)
            job.total = rec.args_total
            job.batch = policy.batch_size(job)
        if rec.finished_at is not None:  # a record rebuilt, not a move: set the final phase
            job.rebuilt(JobPhase(rec.state))
            job.message, job.finished_at = rec.message, rec.finished_at
            job.received = job.done + job.failed
        return job

    def recall(self, job_id: int) -> defer.Deferred[JobState | None]:
        """A job by id, or None: in memory, or a finished one only the journal still keeps
        (brought back into memory, so ``attach`` and ``results`` work for every journaled job),
        read off the reactor thread (see :meth:`Journal.recall`)."""
        job = self.jobs.get(job_id)
        if job is not None or self.journal is None:
            return defer.succeed(job)
        return self.journal.recall(job_id).addCallback(self._recalled, job_id)

    def _recalled(self, rec: Any, job_id: int) -> JobState | None:
        job = self.jobs.get(job_id)  # (recalled meanwhile, for another request)
        if job is None and rec is not None and rec.finished_at is not None:
            job = self.jobs[job_id] = self._restored(rec)
        return job

    @command
    def resume(self, console: Any, msg: m.Resume) -> tuple[JobState | None, str]:
        """A reconnected console takes back the job it feeds: the server drops what it holds of
        it and is sent again what the console has no outcome for (the protocol's ``resume``).
        Returns the job, or None and why not."""
        job = self.jobs.get(msg.job)
        if job is None:
            return None, f"no job {msg.job} on this server (unknown, or finished and forgotten)"
        if job.finished:
            return None, f"job {job.id} ended while its console was away: {job.state} {job.message}"
        if job.options.detach:
            return None, f"job {job.id} is detached: attach to it for its results"
        problem = self._resume_problem(msg)
        if problem:
            return None, problem
        self._drop_work(job)
        job.console = console
        self._console_changed(job)
        job.done, job.failed = msg.done, msg.failed
        job.received, job.received_bytes = msg.done + msg.failed, 0
        job.expect = deque([a, b] for a, b in msg.missing if a < b)
        if job.phase is JobPhase.COMPLETING:  # it sends every argument and args_end again
            job.move(JobPhase.RECEIVING)
        job.first_window = True
        job.granted = self._window(job)
        self._stop_orphan_timer(job)
        self._check_capacity(job)
        self._group_limits((job,))  # (what it was told may have changed while it was away)
        self.log.info(
            "job {id} resumed by its console: {n} arguments to send again, new ones from {sent}",
            id=job.id,
            n=msg.sent - job.received,
            sent=msg.sent,
        )
        self.pump()
        return job, ""

    @staticmethod
    def _resume_problem(msg: m.Resume) -> str:
        """Why a ``resume`` does not add up, or ''."""
        end = 0
        lacking = 0
        for run in msg.missing:
            if len(run) != 2 or not end <= run[0] <= run[1] <= msg.sent:
                return f"resume: missing run {run} is out of order or beyond {msg.sent}"
            end = run[1]
            lacking += run[1] - run[0]
        if min(msg.done, msg.failed) < 0 or msg.done + msg.failed + lacking != msg.sent:
            return (
                f"resume: {msg.done} done + {msg.failed} failed + {lacking} missing is not the "
                f"{msg.sent} arguments sent"
            )
        return ""

    @command
    def repair(self) -> None:
        """After a message handler failed half-way: make each job's counts agree with where its
        arguments really are, and end a job whose arguments were lost rather than let it wait
        forever for them."""
        held: dict[int, int] = {}
        tasks: dict[int, int] = {}
        for node in self.nodes.values():
            for task in node.inflight.values():
                held[task.job.id] = held.get(task.job.id, 0) + len(task.segment)
                tasks[task.job.id] = tasks.get(task.job.id, 0) + 1
        self._all_moved()
        for job in list(self.active.values()):
            job.running = held.get(job.id, 0)
            job.tasks = tasks.get(job.id, 0)
            job.pending_count = sum(len(seg) for seg in job.pending)
            job.pending_bytes = sum(len(seg.payload) for seg in job.pending)
            lost = job.received - job.done - job.failed - job.pending_count - job.running
            if lost > 0:
                self.log.error("job {id} lost track of {n} arguments", id=job.id, n=lost)
                self.finish(
                    job,
                    "failed",
                    f"server error: {lost} argument(s) lost after a failed message (see the "
                    "server log)",
                )
            else:
                self._maybe_complete(job)
        self.pump()
