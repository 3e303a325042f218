"""A detached job's results, a mixin of :class:`~.core.Scheduler`: kept for ``attach`` within a
memory budget, and sent to each attaching console a piece at a time, in order, each once.

With a journal the memory holds only what it has not committed yet: it keeps every result on
disk and serves a replay from there. Without one (``REMAP_JOURNAL=off``) memory is the only
store, so a job whose results reach the budget runs no more calls: nothing is dropped, and the
status says why it waits. A finished job's results stay there ``results_keep`` seconds
(REMAP_DETACHED_RESULTS_KEEP_HOURS), counted in the budget, then are dropped, and attach and
status say so: results nobody collects hold new detached jobs back that long at most.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.python.failure import Failure

from protocol import messages as m
from protocol.errors import RemapError

from ...settings import Settings
from .effects import CancelTimer, Close, command
from .sizing import results_bound
from .state import JobState, Replay

#: bytes of results one replay step sends; the next step waits for a timer (other work runs
#: meanwhile), or for the console to drain once its backlog is congested
REPLAY_BYTES = 4 * 1024 * 1024
_MIB = 1024 * 1024
#: bytes of detached jobs' results the server holds in memory, per job and in all (defaults of
#: REMAP_DETACHED_RESULTS_MEMORY and REMAP_DETACHED_RESULTS_MEMORY_TOTAL)
RESULTS_MEMORY = Settings.detached_results_memory
RESULTS_MEMORY_TOTAL = Settings.detached_results_memory_total
#: seconds a finished detached job's results stay in memory without a journal (the default of
#: REMAP_DETACHED_RESULTS_KEEP_HOURS)
RESULTS_KEEP = Settings.detached_results_keep_hours * 3600.0


class KeptResults:
    """How the scheduler keeps and replays detached jobs' results (mixed into the scheduler)."""

    def _keep(self, job: JobState, msg: m.Results) -> None:
        """Keep a result message of a detached job (in memory until the journal commits it);
        an attached console gets it behind what it is still owed."""
        seq = job.next_seq
        job.next_seq = seq + 1
        job.kept[seq] = msg
        size = results_bound(msg)
        job.kept_bytes += size
        self.kept_bytes += size
        if self.kept_bytes > self.kept_peak:
            self.kept_peak = self.kept_bytes
        if self.journal is not None:  # (may commit at once, and call results_saved)
            self.journal.delivered(job.id, msg, store=True, seq=seq)
        if job.full or (
            job.kept_bytes >= self.results_memory or self.kept_bytes >= self.results_memory_total
        ):
            self._fill(job)
        if job.console is not None and id(job.console) in job.replays:
            self._replay(job, job.console)

    def _fill(self, job: JobState) -> None:
        """The job's results in memory reached a budget: it runs no more calls until they
        are on disk (journal) or, without a journal, for as long as they are kept (its status
        line says how much, kept up to date)."""
        mib = job.kept_bytes / _MIB
        if self.journal is None:
            over = job.kept_bytes >= self.results_memory
            limit = "REMAP_DETACHED_RESULTS_MEMORY" + ("" if over else "_TOTAL")
            of_all = "" if over else f" ({self.kept_bytes / _MIB:.0f} MiB of all detached jobs"
            ended = sum(j.kept_bytes for j in self.jobs.values() if j.finished)
            if ended and not over:
                of_all += (
                    f", {ended / _MIB:.0f} MiB of them finished jobs' results, each dropped "
                    f"{self.results_keep / 3600:g} h after its job ended: "
                    "REMAP_DETACHED_RESULTS_KEEP_HOURS"
                )
            of_all += "" if over else ")"
            why = (
                f"held: {mib:.0f} MiB of results waiting for attach{of_all}, the most "
                f"{limit} keeps in the server's memory; REMAP_JOURNAL is off, so nothing "
                "holds more (attach gets them; kill the job, or run the server with the journal)"
            )
        else:
            trouble = self.journal.trouble or "its writer is behind"
            why = (
                f"held: {mib:.0f} MiB of results waiting for the journal to commit them ({trouble})"
            )
        if not job.full:
            self.events.add(self.clock.seconds(), f"job {job.id} {why}")
            self.log.warn("job {id} {why}", id=job.id, why=why)
        job.full = why
        self._pause(job, pump=False)

    @command
    def results_saved(self, saved: list[tuple[int, int]]) -> None:
        """The journal committed these ``(job, seq)`` result messages: memory lets them go."""
        for job_id, seq in saved:
            job = self.jobs.get(job_id)
            msg = job.kept.pop(seq, None) if job is not None else None
            if msg is not None:
                size = results_bound(msg)
                job.kept_bytes -= size
                self.kept_bytes -= size
        self._unfill()

    def _keep_finished(self, job: JobState) -> None:
        """A detached job ended: without a journal its results stay in memory (for attach, and
        counted in the budget) for ``results_keep`` s, so those nobody collects hold new
        detached jobs back that long at most, not until enough newer jobs push it out."""
        if self.journal is None and job.kept and job.keep_timer is None:
            job.keep_timer = self._start_timer("results-keep", self.results_keep, job.id)

    def _results_expired(self, job: JobState) -> None:
        """The job's results were kept their time: dropped now, or once no console is being
        sent them (a replay half-way would end without the rest)."""
        job.keep_timer = None
        job.expired = True
        self._replay_ended(job)

    def _replay_ended(self, job: JobState) -> None:
        if job.expired and not job.replays:
            self._drop_kept(job)

    def _drop_kept(self, job: JobState) -> None:
        """Let a finished job's results go, saying so where attach and status look."""
        job.expired = False
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.clock.seconds()))
        job.dropped = (
            f"its {job.kept_bytes / _MIB:.1f} MiB of results, which nobody attached to collect, "
            f"were dropped at {at}, {self.results_keep / 3600:g} h after it ended "
            "(REMAP_DETACHED_RESULTS_KEEP_HOURS; REMAP_JOURNAL is off, so the server kept them "
            "in memory only)"
        )
        job.waiting = f"results dropped at {at} (kept {self.results_keep / 3600:g} h)"
        self.events.add(self.clock.seconds(), f"job {job.id} results dropped")
        self.log.info("job {id}: {why}", id=job.id, why=job.dropped)
        self._forget_kept(job)

    def _forget_kept(self, job: JobState) -> None:
        """A job leaves memory (pruned), or its results were dropped: they no longer count.
        One that kept none (an attached job) frees nothing, so no job can run again: no scan
        of the active jobs per pruned job (hundreds queued, each pruning one as it ends)."""
        if job.keep_timer is not None:
            self._outbox.append(CancelTimer(job.keep_timer))
            job.keep_timer = None
        freed = job.kept_bytes
        self.kept_bytes -= freed
        job.kept_bytes = 0
        job.kept = {}
        if freed:
            self._unfill()

    def _unfill(self) -> None:
        """Let jobs whose results were over a budget run again once under both."""
        if self.kept_bytes >= self.results_memory_total:
            return
        for job in self.active.values():
            if job.full and job.kept_bytes < self.results_memory:
                job.full = ""
                self.events.add(self.clock.seconds(), f"job {job.id} results under budget")
                self._pause(job)

    # ---------------------------------------------------------------- replay

    def _start_replay(self, job: JobState, console: Any) -> None:
        """Send ``console`` every result of the job from the first (each attach gets them all:
        an earlier one may have died half-way), then, for a running job, each as it comes."""
        job.replays[id(console)] = Replay(console)
        self._replay(job, console)

    def _replay(self, job: JobState, console: Any, sent: int = 0) -> None:
        """Send ``console`` what it is owed of the job, ``REPLAY_BYTES`` a step (``sent``: bytes
        this step sent already); it gets the ``job_done`` of a finished job after its last
        result. What only the journal holds is read off the reactor thread (a step of a large
        replay held heartbeats and dispatch): the replay goes on when the read comes back."""
        replay = job.replays[id(console)]
        if replay.held or replay.reading or getattr(console, "congested", False):
            return  # hold(False), console_congested(False) or the read goes on
        seq = replay.seq
        while seq < job.next_seq:
            if sent >= REPLAY_BYTES:
                replay.seq = seq
                if job.replay_timer is None:  # (one for every console of the job)
                    job.replay_timer = self._start_timer("replay", 0, job.id)
                return
            msg = job.kept.get(seq)
            if msg is not None:
                self._to_console(console, msg, kept=True)
                sent += results_bound(msg)
            elif self.journal is not None and not self.stopped:
                # committed: read from disk up to the next in memory (those between stay
                # committed, and later ones are numbered from ``next_seq``: none moves)
                end = next((s for s in job.kept if s > seq), job.next_seq)
                replay.seq, replay.reading = seq, True
                read = self.journal.read_results(job.id, seq, end, REPLAY_BYTES - sent)
                read.addCallbacks(
                    self._replay_read,
                    self._replay_unread,
                    callbackArgs=(job, replay, end, sent),
                    errbackArgs=(job, replay),
                )
                return
            elif self.journal is not None:
                return  # the server stops: its journal is closing
            seq += 1
        replay.seq = seq
        if job.finished:
            del job.replays[id(console)]
            self._send(console, self._done_message(job))
            self._replay_ended(job)

    @command
    def _replay_read(
        self, found: list[tuple[int, m.Results]], job: JobState, replay: Replay, end: int, sent: int
    ) -> None:
        """The journal's results ``replay.seq`` up to ``end`` (or as many as a step takes):
        sent, and the replay goes on."""
        replay.reading = False
        console = replay.console
        if job.replays.get(id(console)) is not replay:
            return  # it left, or attached again (and is sent everything from the first)
        for _, msg in found:
            self._to_console(console, msg, kept=True)
            sent += results_bound(msg)
        # (none between: lost with a failed commit and a restart, or pruned)
        replay.seq = found[-1][0] + 1 if found else end
        self._replay(job, console, sent)

    @command
    def _replay_unread(self, failure: Failure, job: JobState, replay: Replay) -> None:
        """A read for a replay failed: the journal closed (the server stops), or SQLite could
        not read (a damaged file): that console is told why and let go, the job runs on."""
        replay.reading = False
        console = replay.console
        if job.replays.get(id(console)) is not replay:
            return
        del job.replays[id(console)]
        self._replay_ended(job)
        if self.stopped:
            return
        self.log.failure("job {id}: reading its results from the journal", failure, id=job.id)
        why = f"the server could not read job {job.id}'s results from its journal: "
        self._outbox.append(Close(console, RemapError(why + str(failure.value)[:300])))

    def _replay_timer(self, job: JobState) -> None:
        """A replay step's timer: every console of the job that is owed more goes on."""
        job.replay_timer = None
        for key, replay in list(job.replays.items()):
            if job.replays.get(key) is replay and replay.seq < job.next_seq:
                self._replay(job, replay.console)

    def _replay_drained(self, console: Any) -> None:
        """``console`` drained its backlog: its replays go on."""
        for job in list(self.jobs.values()):
            if id(console) in job.replays:
                self._replay(job, console)
