"""The server's scheduler, in rooms: segments (argument runs), state (records and job phases),
policy (batch sizes, fair share, deadlines), effects (events in, effects out), answers (results
and failures from nodes), recovery (journal, resume, repair) and core (the :class:`Scheduler`)."""

from ...transitions import IllegalTransition
from .core import JOB_ID_EPOCH, Scheduler, first_job_id
from .policy import (
    MAX_BATCH_BYTES,
    MAX_PENDING_BYTES,
    MIN_WINDOW,
    NO_TIMEOUT_MIN,
    SWEEP_INTERVAL,
    TARGET_BATCH_SECONDS,
    TASK_SLACK,
)
from .segments import Segment, take_from
from .state import (
    PREFETCH,
    TRANSITIONS,
    JobPhase,
    JobState,
    left_out_of_files,
    missing,
)

__all__ = [
    "JOB_ID_EPOCH",
    "MAX_BATCH_BYTES",
    "MAX_PENDING_BYTES",
    "MIN_WINDOW",
    "NO_TIMEOUT_MIN",
    "PREFETCH",
    "SWEEP_INTERVAL",
    "TARGET_BATCH_SECONDS",
    "TASK_SLACK",
    "TRANSITIONS",
    "IllegalTransition",
    "JobPhase",
    "JobState",
    "Scheduler",
    "Segment",
    "first_job_id",
    "left_out_of_files",
    "missing",
    "take_from",
]
