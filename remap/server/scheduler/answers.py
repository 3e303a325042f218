"""Answers from nodes, a mixin of :class:`~.core.Scheduler`: a result is checked, delivered
and counted once; a failure blames the running argument and re-queues the rest; a task past
its deadline is failed as ``no-answer`` and its node marked suspect.
"""

from __future__ import annotations

from typing import Any

from protocol import messages as m

from . import policy
from .effects import Close, command
from .policy import SWEEP_INTERVAL
from .segments import Segment, cut
from .sizing import PER_RESULT, RESULTS_HEADROOM, fit_results, fits, results_bound
from .state import JobState, NodeState, TaskState

#: a task's failure (its reason): the error type of an argument it fails, and what happened
_FAILURES = {
    "timeout": ("TaskTimeout", "timed out"),
    "crash": ("CoreCrashed", "crashed its core"),
    "too-large": ("ResultTooLarge", "returned a result too large to send"),
    "no-answer": ("TaskTimeout", "got no answer from its node"),
}


class NodeAnswers:
    """What the scheduler does with a node's answers (mixed into the scheduler)."""

    def _check_deadlines(self) -> None:
        """A node that heartbeats but never answers must not hold its tasks forever: a task past
        its deadline fails as ``no-answer`` and the node is suspect until it answers."""
        self._sweep = None
        now = self.clock.seconds()
        expired = [task for node in list(self.nodes.values()) for task in policy.expired(node, now)]
        for task in expired:
            node = task.node
            if task.id not in node.inflight or node.id not in self.nodes:
                continue
            waited = now - task.sent_at
            if not node.suspect:
                self.log.warn(
                    "node {id} ({host}) gave no answer to task {t} of job {job} in {s:.0f}s: "
                    "re-queued, node marked suspect",
                    id=node.id,
                    host=node.host,
                    t=task.id,
                    job=task.job.id,
                    s=waited,
                )
            node.suspect = True
            self._ready.pop(node.id, None)
            self.task_failed(
                node.id,
                m.TaskFailed(
                    task=task.id,
                    reason="no-answer",
                    at=-1,
                    message=f"no answer from node {node.host} in {waited:.0f}s",
                ),
            )
        if any(node.inflight for node in self.nodes.values()):
            self._sweep = self._start_timer("sweep", SWEEP_INTERVAL)

    def _heard_from(self, node: NodeState | None) -> bool:
        """Any answer proves a suspect node is working again; True if it was suspect."""
        if node is None or not node.suspect:
            return False
        node.suspect = False
        self.log.info("node {id} answered again: no longer suspect", id=node.id)
        if node.has_credit():
            self._ready[node.id] = node
        return True

    def _requeue(self, job: JobState, seg: Segment, last: bool = False) -> None:
        """Queue ``seg`` again, first (``last``: after what is queued)."""
        if last:
            job.pending.append(seg)
        else:
            job.pending.appendleft(seg)
        job.pending_count += len(seg)
        job.pending_bytes += len(seg.payload)
        self._moved[job.id] = self._regrant[job.id] = job

    def _release(self, node: NodeState, task_id: int) -> TaskState | None:
        task = node.inflight.pop(task_id, None)
        if task is None:
            return None
        job = task.job
        job.running -= len(task.segment.indices)
        job.tasks -= 1
        self._moved[job.id] = self._regrant[job.id] = job  # (its batch may change too)
        node.tasks_done += 1
        for watcher in self.watchers:
            watcher.batch_finished(
                job,
                task.answered + len(task.segment.indices),
                self.clock.seconds() - task.sent_at,
            )
        if node.has_credit() and node.id in self.nodes:
            self._ready[node.id] = node
        return task

    @command
    def task_result(self, node_id: str, msg: m.TaskResult) -> None:
        node = self.nodes.get(node_id)
        # (asked only of a suspect node: _heard_from's answer for any other is False)
        cleared = node is not None and node.suspect and self._heard_from(node)
        if msg.part:
            task, seg = self._take_part(node, msg.task, msg.part)
        else:
            task = self._release(node, msg.task) if node is not None else None
            seg = task.segment if task is not None else None
        if task is None or seg is None:  # a late answer for work re-queued, cancelled or finished
            if cleared:
                self.pump()
            return
        job, n = task.job, len(seg.indices)  # (len(seg) is a Python call)
        problem = self._malformed(msg, n) if n else f"a part of {msg.part} arguments"
        if problem:
            # the arguments go back to the queue and this node gets nothing more
            self.log.error(
                "node {id} answered task {t} wrongly: {problem}",
                id=node_id,
                t=msg.task,
                problem=problem,
            )
            if n:
                self._requeue(job, seg)
            self.remove_node(node_id, f"bad answer to task {msg.task}: {problem}")
            self._outbox.append(Close(node.link))
            return
        n_err = len(msg.errors)
        # Results.of without its **fields (a dict built and unpacked on every answer)
        listed, start, count = m.Results.layout(seg.indices)
        results = m.Results.make(
            job=job.id,
            indices=listed,
            start=start,
            count=count,
            sizes=msg.sizes,
            errors=msg.errors,
            output=msg.output,
            partial=msg.partial,
            packed=msg.packed,
            payload=msg.payload,
        )
        # frames to the console within its limit: a bound first, without encoding (a size and
        # an index per argument at most, 9 bytes each; text at 4 bytes a character)
        limit = getattr(job.console, "frame_limit", 0)
        first = None  # (index, type, text) of the first error, when sizing made the pieces
        if (
            limit
            and (
                n_err
                or len(msg.payload) + 4 * len(msg.output) + PER_RESULT * n + RESULTS_HEADROOM
                > limit
            )
            and not job.options.detach  # (its results are stored whole, sized as they leave)
            and not fits(results, limit)
        ):
            if n > 1 and (msg.packed or msg.partial):
                self._one_by_one(job, seg, results, limit)
                return
            n_err = 0
            for piece in fit_results(results, limit, self.max_frame):
                self._deliver(job, piece, sized=True)
                if piece.errors and first is None:
                    pos, type_name, text = piece.errors[0][:3]
                    first = (piece.answered[pos], type_name, text)
                n_err += len(piece.errors)
        else:
            self._deliver(job, results, sized=True)
        # the call time measured (after the delivery, which does not read it: sent sooner)
        if msg.elapsed > 0 and n:
            sample = msg.elapsed / n
            job.per_call = sample if job.per_call is None else 0.7 * job.per_call + 0.3 * sample
            size = len(msg.payload) / n  # and the bytes of a result: what a batch brings back
            job.result_size = size if not job.result_size else 0.7 * job.result_size + 0.3 * size
            job.batch = policy.batch_size(job)
        # counted once delivered: if delivery raises half-way, repair() sees the arguments lost
        # (a send that raises does not: Scheduler.unsent notes it and the count goes on)
        job.done += n - n_err
        job.failed += n_err
        if n_err and job.options.on_error == "fail":
            if first is None:
                pos, type_name, text = msg.errors[0][:3]
                first = (seg.indices[pos], type_name, text)
            index, type_name, text = first
            # (an exception with no message, e.g. KeyboardInterrupt, gives no ": ")
            said = f"{type_name}: {text}" if text else type_name
            self.finish(job, "failed", f"argument {index} raised {said}")
            return
        self._maybe_complete(job)
        self.pump()

    def _one_by_one(self, job: JobState, seg: Segment, results: m.Results, limit: int) -> None:
        """A packed batch or a partial fold (one pickle) too large for a frame to its console:
        each argument runs again alone (no attempt counted), so only a result that cannot fit
        by itself becomes its error; later batches hold no more than fitted (``result_cap``)."""
        n = len(seg.indices)
        size = len(results.payload) + 1
        job.result_cap = max(1, min(job.result_cap or n, n * limit // (2 * size)))
        self.log.info(
            "job {id}: results of {n} arguments ({size} bytes in one pickle) are over the "
            "{limit}-byte frame limit of its console; running them one by one",
            id=job.id,
            n=n,
            size=size - 1,
            limit=limit,
        )
        for i in range(n - 1, -1, -1):
            alone = cut(seg, i, i + 1)
            alone.solo = True
            self._requeue(job, alone)
        self._maybe_complete(job)
        self.pump()

    def _take_part(
        self, node: NodeState | None, task_id: int, part: int
    ) -> tuple[TaskState | None, Segment | None]:
        """A streamed part answers the task's next ``part`` arguments; the rest stay in flight
        (a part of all that is left is malformed: the last answer is the plain result)."""
        task = node.inflight.get(task_id) if node is not None else None
        if task is None:
            return None, None
        seg = task.segment
        if not 0 < part < len(seg):
            return task, cut(seg, 0, 0)
        task.segment = cut(seg, part, len(seg))
        task.answered += part
        task.job.running -= part
        task.sent_at = self.clock.seconds()  # the rest's deadline counts from its first call
        return task, cut(seg, 0, part)

    @staticmethod
    def _malformed(msg: m.TaskResult, n: int) -> str:
        """Why a node's answer to a task of ``n`` arguments cannot be delivered, or ''."""
        sizes = msg.sizes
        if msg.packed:
            if msg.partial or len(sizes) != 1:
                return "a packed answer is one pickle and no partial fold"
        elif msg.partial:
            if len(sizes) > 1:
                return f"a partial fold of {len(sizes)} pickles"
        elif len(sizes) != n:
            return f"{len(sizes)} results for {n} arguments"
        # (not ``min(sizes, default=0)``: a builtin's keyword costs more than the rest here)
        if sum(sizes) != len(msg.payload) or (sizes and min(sizes) < 0):
            return "result sizes do not add up to the payload"
        errors = msg.errors
        if not errors:  # every call returned: nothing more to check
            return ""
        for entry in errors:  # [position in the batch, type, message, traceback]
            if not (
                type(entry) is list
                and len(entry) == 4
                and type(entry[0]) is int
                and 0 <= entry[0] < n
                and all(type(x) is str for x in entry[1:])
            ):
                return f"malformed error entry {str(entry)[:80]}"
        positions = [e[0] for e in errors]
        if len(set(positions)) != len(positions):
            return "error positions repeated"
        return ""

    @command
    def task_failed(self, node_id: str, msg: m.TaskFailed) -> None:
        """A batch's core crashed or timed out: blame the running argument, re-queue the rest."""
        node = self.nodes.get(node_id)
        cleared = msg.reason != "no-answer" and self._heard_from(node)
        task = self._release(node, msg.task) if node is not None else None
        if task is None:
            if cleared:
                self.pump()
            return
        job, seg = task.job, task.segment
        if job.finished:
            return
        at = msg.at - task.answered  # the node counts positions from the task's first argument
        at = at if 0 <= at < len(seg) else -1
        span = min(max(1, msg.span), len(seg) - at) if at >= 0 else 1
        if msg.reason == "too-large" and len(seg) > 1:
            # the batch's results were too large for one frame: nothing failed, so each argument
            # runs again alone without counting an attempt (as results too large for the
            # console's frames do: see _one_by_one); one still too large alone fails then
            suspects = []
            innocent = [cut(seg, i, i + 1) for i in range(len(seg))]
            for alone in innocent:
                alone.solo = True
        elif at < 0:
            # unknown culprit: every argument is suspect, so each retries alone
            suspects = [cut(seg, i, i + 1) for i in range(len(seg))]
            innocent: list[Segment] = []
        elif span > 1:
            # the core was running an argument group: explode it, each of its arguments re-runs
            # alone (no attempt counted: which one crashed is not known yet), so the culprit's
            # own crash is the one that counts and the others are delivered once
            suspects = []
            innocent = [cut(seg, 0, at)]
            innocent += [cut(seg, i, i + 1) for i in range(at, at + span)]
            innocent.append(cut(seg, at + span, len(seg)))
            innocent = [s for s in innocent if len(s)]
        else:
            suspects = [cut(seg, at, at + 1)]
            innocent = [s for s in (cut(seg, 0, at), cut(seg, at + 1, len(seg))) if len(s)]
        for part in reversed(innocent):
            self._requeue(job, part)
        errors = []
        # a result too large for a frame, from a lone argument, is that argument's own result:
        # running it again gives the same (retries are for crashes and timeouts)
        alone_too_large = msg.reason == "too-large" and len(seg) == 1
        for s in suspects:
            s.attempts += 1
            if s.attempts > job.options.retries or alone_too_large:
                errors.append(s)
            else:
                self._requeue(job, s)
        if errors:
            type_name, what = _FAILURES.get(msg.reason, ("CoreCrashed", msg.reason))
            if msg.reason == "timeout" and job.options.timeout:
                what = f"timed out after {job.options.timeout:g}s"
            for s in errors:
                text = what
                if msg.reason != "too-large":
                    text += f" {s.attempts} time{'s' if s.attempts != 1 else ''}"
                if msg.message:
                    text += f" ({msg.message})"
                job.failed += 1
                error = [0, type_name, text, ""]
                self._deliver(job, m.Results.of(job.id, s.indices, sizes=[0], errors=[error]))
                if job.options.on_error == "fail":
                    self.finish(job, "failed", f"argument {s.indices[0]} {text}")
                    return
        self._maybe_complete(job)
        self.pump()

    def _deliver(self, job: JobState, msg: m.Results, sized: bool = False) -> None:
        """Record and send results to the job's console. ``sized``: ``msg`` is known to fit
        its console's frames."""
        for watcher in self.watchers:
            watcher.results_delivered(job, msg)
        # a detached job keeps every result on the server (journaled: only a detached job
        # resumes after a restart), so any later `attach` (even after an earlier one died
        # half-way) gets them all; its submitter only feeds arguments
        if job.options.detach:
            self._keep(job, msg)
        elif job.console is not None:
            if sized:
                self._send(job.console, msg)
            else:
                self._to_console(job.console, msg)

    def _to_console(self, link: Any, msg: m.Results, kept: bool = False) -> None:
        """Send results in frames the console accepts (see :func:`~.sizing.fit_results`).
        ``kept``: a detached job's stored results, which the server keeps whole."""
        limit = getattr(link, "frame_limit", 0)
        if limit and (msg.errors or results_bound(msg) > limit):
            for piece in fit_results(msg, limit, self.max_frame, kept):
                self._send(link, piece)
        else:
            self._send(link, msg)
