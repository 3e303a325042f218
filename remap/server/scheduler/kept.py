"""A detached job's results, a mixin of :class:`~.core.Scheduler`: kept for ``attach`` within a
memory budget, and sent to each attaching console a piece at a time, in order, each once.

With a journal the memory holds only what it has not committed yet: it keeps every result on
disk and serves a replay from there. Without one (``REMAP_JOURNAL=off``) memory is the only
store, so a job whose results reach the budget runs no more calls: nothing is dropped, and the
status says why it waits.
"""

from __future__ import annotations

from typing import Any

from protocol import messages as m

from ...settings import Settings
from .effects import command
from .sizing import results_bound
from .state import JobState

#: bytes of results one replay step sends; the next step waits for a timer (other work runs
#: meanwhile), or for the console to drain once its backlog is congested
REPLAY_BYTES = 4 * 1024 * 1024
_MIB = 1024 * 1024
#: bytes of detached jobs' results the server holds in memory, per job and in all (defaults of
#: REMAP_DETACHED_RESULTS_MEMORY and REMAP_DETACHED_RESULTS_MEMORY_TOTAL)
RESULTS_MEMORY = Settings.detached_results_memory
RESULTS_MEMORY_TOTAL = Settings.detached_results_memory_total


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
            of_all = "" if over else f" ({self.kept_bytes / _MIB:.0f} MiB of all detached jobs)"
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

    def _forget_kept(self, job: JobState) -> None:
        """A job leaves memory (pruned): its kept results no longer count."""
        self.kept_bytes -= job.kept_bytes
        job.kept_bytes = 0
        job.kept = {}
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
        job.replays[id(console)] = [console, 0, False]
        self._replay(job, console)

    def _replay(self, job: JobState, console: Any) -> None:
        """Send ``console`` what it is owed of the job, ``REPLAY_BYTES`` a step; it gets the
        ``job_done`` of a finished job after its last result."""
        replay = job.replays[id(console)]
        if replay[2] or getattr(console, "congested", False):
            return  # hold(False) or console_congested(False) goes on
        seq = replay[1]
        sent = 0
        while seq < job.next_seq:
            if sent >= REPLAY_BYTES:
                replay[1] = seq
                if job.replay_timer is None:  # (one for every console of the job)
                    job.replay_timer = self._start_timer("replay", 0, job.id)
                return
            if seq in job.kept:
                found = [(seq, job.kept[seq])]
            elif self.journal is not None:  # committed: read from disk up to the next in memory
                end = next((s for s in job.kept if s > seq), job.next_seq)
                found = self.journal.results(job.id, seq, end, REPLAY_BYTES - sent) or [
                    (end - 1, None)  # (none between: lost with a failed commit and a restart)
                ]
            else:
                found = [(seq, None)]
            for _, msg in found:
                if msg is not None:
                    self._to_console(console, msg, kept=True)
                    sent += results_bound(msg)
            seq = found[-1][0] + 1
        replay[1] = seq
        if job.finished:
            del job.replays[id(console)]
            self._send(console, self._done_message(job))

    def _replay_timer(self, job: JobState) -> None:
        """A replay step's timer: every console of the job that is owed more goes on."""
        job.replay_timer = None
        for key, (console, seq, _) in list(job.replays.items()):
            if key in job.replays and seq < job.next_seq:
                self._replay(job, console)

    def _replay_drained(self, console: Any) -> None:
        """``console`` drained its backlog: its replays go on."""
        for job in list(self.jobs.values()):
            if id(console) in job.replays:
                self._replay(job, console)
