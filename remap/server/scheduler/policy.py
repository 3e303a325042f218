"""Batch policy, pure functions of the scheduler's records: how big a batch is, which job a
free slot serves (fair share by weight), how long a task may take, a console's windows."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from protocol import messages as m

from .state import PREFETCH, JobState, NodeState, TaskState

#: seconds of work a batch should hold on one core, when call times are known
TARGET_BATCH_SECONDS = 0.05
MAX_BATCH_ARGS = 50_000
#: bytes of arguments a batch may carry: an argument of more than half of this travels alone
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: bytes of results a batch should bring back once a job's result size is measured (bounds
#: what its tasks in flight bring to the server and to a console that holds the job)
MAX_BATCH_RESULT_BYTES = 4 * 1024 * 1024
#: bound on argument bytes queued on the server per job (console windowing keeps to it)
MAX_PENDING_BYTES = 64 * 1024 * 1024
#: a task's deadline, past which its node is presumed stuck: calls × the job's ``timeout`` +
#: TASK_SLACK (the node's own timer, a core restart, the network); without a timeout,
#: NO_TIMEOUT_FACTOR × its calls' measured time, at least NO_TIMEOUT_MIN seconds
TASK_SLACK = 5.0
NO_TIMEOUT_FACTOR = 100
NO_TIMEOUT_MIN = 600.0
#: how often in-flight tasks are checked against their deadlines
SWEEP_INTERVAL = 1.0
MIN_WINDOW = m.INITIAL_WINDOW  # never below what a console may send before `submitted`
MAX_WINDOW = 1_000_000
#: a job of known size up to this many arguments is granted whole from the start
SMALL_JOB = 16_384


# ==================================================================== windows and batch sizes


def window(job: JobState, credits: int) -> int:
    """How many arguments the server wants queued for a job, from the credits that may run it.

    A detached job takes all it can (bounded in bytes by :func:`grant`): its console leaves
    once every argument is on the server. A small job of known size comes whole: its console
    never waits for a grant mid-job.
    """
    if job.options.detach:
        return MAX_WINDOW
    # (conditional expressions, not min/max: a builtin parses keywords, ~800 instructions, and
    # this runs twice per answer on a single call's path)
    size = job.batch
    want = 2 * (credits or PREFETCH) * (size if size > 16 else 16)
    total = job.total
    if total > 0:
        whole = total if total < SMALL_JOB else SMALL_JOB
        if whole > want:
            want = whole
    return MIN_WINDOW if want < MIN_WINDOW else MAX_WINDOW if want > MAX_WINDOW else want


def grant(job: JobState, credits: int) -> int:
    """More arguments the console may send now (0: none), bounded in count and in bytes."""
    if not job.receiving or job.console is None or job.first_window:
        return 0
    if job.pending_bytes >= MAX_PENDING_BYTES:
        return 0
    want = window(job, credits)
    if job.received:  # argument sizes known: bounded in bytes too
        per_arg = job.received_bytes // job.received or 1
        fits = MAX_PENDING_BYTES // per_arg
        if fits < want:
            want = fits or 1
    # the console sends whole argument groups: one must always fit, or it waits forever
    group_max = job.group_max
    if group_max > want:
        want = group_max
    more = want - job.pending_count - job.granted
    short = group_max - job.granted  # > 0: the largest group would not fit now
    return more if more >= (want // 4 or 1) or 0 < short <= more else 0


#: the tail of a known-size job is shared out in batches of at least this much measured work
TAIL_MIN_SECONDS = 0.0005


def batch_size(job: JobState) -> int:
    """Arguments per batch (``job.batch``): ``TARGET_BATCH_SECONDS`` of measured work, bringing
    back ``MAX_BATCH_RESULT_BYTES`` at most. Before a call is measured, one call (or argument
    group) per batch: the first calls spread over every free core, and a first round of large
    results is a few of them, not the whole job in flight at once."""
    if job.options.gang:
        return 1
    if job.options.chunksize:
        return job.options.chunksize
    per_call = job.per_call
    if per_call is None:
        return 1
    size = int(TARGET_BATCH_SECONDS / (per_call if per_call > 1e-7 else 1e-7))
    if job.result_size * size > MAX_BATCH_RESULT_BYTES:
        size = int(MAX_BATCH_RESULT_BYTES / job.result_size)
    return 1 if size < 1 else MAX_BATCH_ARGS if size > MAX_BATCH_ARGS else size


def tail_share(job: JobState, size: int, credits: int) -> int:
    """Shrink batches near the end of a job so every core gets some of the tail (its size is
    from ``args_end`` or the console's ``total`` hint); an explicit ``chunksize`` is kept."""
    if job.options.chunksize:
        return size
    if job.total < 0:
        # unknown size (``Executor.submit``, a lazy ``imap``): what is queued, shared by the
        # credits it does not hold yet, so calls queued behind a slow one are at most its share
        free = credits - job.tasks
        share = -(-job.pending_count // (free if free > 1 else 1))
        share = size if size < share else share
        return share if share > 1 else 1
    left = job.pending_count + max(0, job.total - job.received)
    share = -(-left // (credits or 1))
    if job.per_call is not None:
        # a batch costs ~0.1 ms to send and answer: sharing out less work costs more than it saves
        share = max(share, int(TAIL_MIN_SECONDS / max(job.per_call, 1e-7)))
    return max(1, min(size, share))


# ==================================================================== fair share


def next_job(
    jobs: Iterable[JobState], node: NodeState, may_run: Callable[[NodeState, JobState], bool]
) -> JobState | None:
    """Fair share by weight: the job furthest below its ``min_cores``, else the one whose
    tasks in flight per weight would be lowest with one more (ties: higher priority, then
    older); ``max_cores`` is a hard cap."""
    best: JobState | None = None
    best_key: tuple | None = None  # computed once a second job competes (one job: no key)
    for job in jobs:
        if job.options.gang and len(node.inflight) >= node.cores:
            continue  # a gang call queued behind another call on a node could wait forever
        if not job.pending_count or job.finished or job.paused or not may_run(node, job):
            continue
        if job.options.max_cores and job.tasks >= job.options.max_cores:
            continue
        if best is None:
            best = job
            continue
        if best_key is None:
            best_key = share_key(best)
        key = share_key(job)
        if key < best_key:
            best, best_key = job, key
    return best


def share_key(job: JobState) -> tuple:
    """Lowest first: under ``min_cores``, then tasks per weight with one more, priority, age
    (unique: the job's id decides last, so which job is lowest never depends on order)."""
    options = job.options
    return (
        job.tasks >= options.min_cores,
        (job.tasks + 1) / (options.min_cores if job.tasks < options.min_cores else job.weight),
        -options.priority,
        job.id,
    )


def busy_weight(active: Iterable[JobState]) -> float:
    """The weight of the jobs with work queued or in flight: what shares divide."""
    return sum(j.weight for j in active if j.pending_count or j.tasks)


def entitled(job: JobState, busy: float, credits: int) -> int:
    """Task slots ``job`` is entitled to now: its weight's part (of ``busy``, the
    :func:`busy_weight` of the active jobs) of the slots it may use."""
    share = int(credits * job.weight / (busy or job.weight))
    return min(share, job.options.max_cores) if job.options.max_cores else share


# ==================================================================== task deadlines


def task_limit(task: TaskState) -> float | None:
    """Seconds a task may take on its core, or None when nothing bounds it yet."""
    job, n = task.job, len(task.segment)
    if job.options.gang:
        return None  # a gang call (vertex worker) runs as long as its job; its driver watches it
    if job.options.timeout is not None:
        return n * job.options.timeout + TASK_SLACK
    if job.per_call is None:
        return None  # no call of this job was measured yet: nothing to go by
    return max(NO_TIMEOUT_MIN, NO_TIMEOUT_FACTOR * n * job.per_call)


def expired(node: NodeState, now: float) -> list[TaskState]:
    """The node's tasks past their deadline: a task's own limit, counted after the longest
    task sent before it (it may queue behind it); none once a task without a limit is ahead."""
    late: list[TaskState] = []
    wait = 0.0
    for task in node.inflight.values():  # a dict keeps the order tasks were sent in
        own = task_limit(task)
        if own is None:
            break
        if now > task.sent_at + wait + own:
            late.append(task)
        wait = max(wait, own)
    return late
