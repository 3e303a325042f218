"""Frames to a peer sized to the limit its ``about.max_frame`` said (pure: no links, no clock).

A peer refuses a frame over its limit by closing the connection, and would be sent the same
frame again when it comes back, for ever. So to a console a ``results`` message is split, a
result that cannot fit alone becomes its error (``ResultTooLarge``) and a status reply leaves
out its oldest finished jobs; to a node a task holds no more than :func:`task_limits` allows,
and a pickle or a job's function too large for every node that may run it is that argument's
error (``ArgumentTooLarge``) or the job's. A frame's size is its ``length`` field, header
included (:func:`protocol.framing.frame_length`).
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol import messages as m
from protocol.framing import frame_length

from .policy import MAX_BATCH_BYTES

#: bytes a ``results`` header takes besides its lists and text: every key, the job id, the
#: run's start and count, the flags and the headers of the lists and the text (about 120)
RESULTS_HEADROOM = 256
#: bytes of a msgpack integer at most
INT_MAX = 9
#: bytes one result adds to a header at most: its size and its index
PER_RESULT = 2 * INT_MAX
#: the error type of a result too large for its console's frames (or a node's: ``answers.py``)
TOO_LARGE = "ResultTooLarge"

#: bytes a ``task`` header takes besides its lists: every key, the task and job ids, ``skip``,
#: ``count`` and the lists' headers (about 60); a ``job_load``'s header is smaller
TASK_HEADROOM = 256
#: bytes one pickle adds to a ``task`` header at most: its size and its group's count
PER_PICKLE = 2 * INT_MAX
#: the error type of an argument too large for the frames of every node that may run it
ARG_TOO_LARGE = "ArgumentTooLarge"
#: arguments a task may hold when its node's frames are no bound on it
NO_CAP = 1 << 62
#: a node whose frames take this much takes any batch (a pickle is a byte at least)
ROOMY = (PER_PICKLE + 1) * MAX_BATCH_BYTES + TASK_HEADROOM


def results_bound(msg: m.Results) -> int:
    """An upper bound on the frame length of ``msg`` without errors, not encoded (asked of
    every delivery; text counts 4 bytes a character, UTF-8's most)."""
    return (
        len(msg.payload)
        + 4 * len(msg.output)
        + INT_MAX * (len(msg.sizes) + len(msg.indices))
        + RESULTS_HEADROOM
    )


def fits(msg: m.Message, limit: int) -> bool:
    """Whether ``msg`` travels in a frame of at most ``limit`` (encoded to know)."""
    return frame_length(*m.encode(msg)) <= limit


def too_large_text(need: int, limit: int, server_limit: int, kept: bool = False) -> str:
    """The one line a result too large for its console's frames is reported with. ``kept``: a
    detached job's result, which the server keeps for a console with larger frames."""
    if kept:
        return (
            f"its result needs a frame of {need:,} bytes, over the limit of {limit:,} bytes on "
            "frames to this console; the server keeps it: attach with a larger REMAP_MAX_FRAME "
            "to get it"
        )
    whose = "the console's" if limit < server_limit else "the console's and the server's"
    return (
        f"its result needs a frame of {need:,} bytes, over the limit of {limit:,} bytes on "
        f"frames to this console: raise {whose} REMAP_MAX_FRAME"
    )


def _cut_output(output: str, limit: int) -> str:
    """What a batch printed, cut to a quarter of the frame at most (it rides on its first
    piece)."""
    room = limit // 16  # characters: 4 bytes each at most
    if 4 * len(output) <= limit // 4:
        return output
    return output[:room] + f"\n... ({len(output) - room} more characters cut: frame limit)"


def _error_entry(pos: int, text: str) -> list[Any]:
    return [pos, TOO_LARGE, text, ""]


def fit_results(
    msg: m.Results, limit: int, server_limit: int, kept: bool = False
) -> list[m.Results]:
    """``msg`` as messages that each travel in a frame of at most ``limit`` bytes, in order.

    Split between results; a result too large for a frame by itself becomes that argument's
    :data:`TOO_LARGE` error. A packed batch or a partial fold is one pickle for all its
    arguments: if it does not fit, each of them gets that error. ``kept``: see
    :func:`too_large_text`; ``msg`` itself is never changed.
    """
    if fits(msg, limit):
        return [msg]
    answered = msg.answered
    n = len(answered)
    output = _cut_output(msg.output, limit)
    errors = {e[0]: e for e in msg.errors}
    if msg.packed or msg.partial or len(msg.sizes) != n:
        need = frame_length(*m.encode(msg))
        text = too_large_text(need, limit, server_limit, kept)
        return [
            m.Results.of(
                msg.job,
                answered,
                sizes=[] if msg.partial else [0] * n,
                errors=[errors.get(i) or _error_entry(i, text) for i in range(n)],
                output=output,
                partial=msg.partial,
            )
        ]
    payload = memoryview(msg.payload)
    offsets = [0]
    for size in msg.sizes:
        offsets.append(offsets[-1] + size)

    def piece(a: int, b: int, text: str, lone_error: list[Any] | None = None) -> m.Results:
        if lone_error is not None:  # one result, replaced by its error
            return m.Results.of(msg.job, answered[a:b], sizes=[0], errors=[lone_error], output=text)
        return m.Results.of(
            msg.job,
            answered[a:b],
            sizes=msg.sizes[a:b],
            errors=[[e[0] - a, *e[1:]] for i in range(a, b) if (e := errors.get(i))],
            output=text,
            payload=payload[offsets[a] : offsets[b]],
        )

    def cost(i: int) -> int:
        entry = errors.get(i)
        extra = len(msgpack.packb(entry, use_bin_type=True)) if entry is not None else 0
        return msg.sizes[i] + PER_RESULT + extra

    pieces: list[m.Results] = []
    a = 0
    while a < n:
        text = output if not pieces else ""
        room = limit - RESULTS_HEADROOM - 4 * len(text)
        b, used = a, 0
        while b < n and used + cost(b) <= room:
            used += cost(b)
            b += 1
        if b > a:
            pieces.append(piece(a, b, text))
            a = b
            continue
        lone = piece(a, a + 1, text)  # the bound says no: the exact size decides
        if not fits(lone, limit):
            need = frame_length(*m.encode(lone))
            entry = _error_entry(0, too_large_text(need, limit, server_limit, kept))
            lone = piece(a, a + 1, text, entry)
        pieces.append(lone)
        a += 1
    return pieces


def fit_status(reply: m.StatusReply, limit: int) -> m.StatusReply | None:
    """``reply`` in a frame of at most ``limit`` bytes: without its oldest finished jobs if it
    must (running ones stay); None if even that does not fit."""
    if fits(reply, limit):
        return reply
    over = frame_length(*m.encode(reply)) - limit
    jobs = list(reply.jobs)
    dropped: set[int] = set()
    for k, job in enumerate(jobs):
        if over <= 0:
            break
        if job.get("state") != "running":
            dropped.add(k)
            over -= len(msgpack.packb(job, use_bin_type=True))
    kept = [job for k, job in enumerate(jobs) if k not in dropped]
    trimmed = m.StatusReply(re=reply.re, nodes=reply.nodes, jobs=kept, server=reply.server)
    return trimmed if fits(trimmed, limit) else None


def task_limits(limit: int) -> tuple[int, int]:
    """``(arguments, bytes of pickles)`` a task to a node whose frames take ``limit`` bytes may
    hold, so its frame fits whatever the pickles are (the header a quarter of it at most).
    ``limit`` 0 (an in-process link) or over :data:`ROOMY`: the scheduler's own bounds. A
    pickle over the bytes travels alone and is measured by itself."""
    if not limit or limit >= ROOMY:
        return NO_CAP, MAX_BATCH_BYTES
    room = limit - TASK_HEADROOM
    args = max(1, room // (4 * PER_PICKLE))
    return args, max(0, min(MAX_BATCH_BYTES, room - PER_PICKLE * args))


def task_bound(nbytes: int, pickles: int) -> int:
    """An upper bound on the frame length of a task of ``pickles`` pickles in ``nbytes``."""
    return nbytes + PER_PICKLE * pickles + TASK_HEADROOM


def group_room(limit: int) -> int:
    """Bytes one pickle may have to fit a node's frames of ``limit`` bytes alone in a task:
    what a console is told in ``group_limit``."""
    return max(1, limit - TASK_HEADROOM - PER_PICKLE)


def node_too_large_text(what: str, need: int, limit: int, server_limit: int) -> str:
    """The one line a message (``what``: "its task", "the job's function") too large for the
    frames of every node that may take it is reported with."""
    whose = "the nodes'" if limit < server_limit else "the nodes' and the server's"
    return (
        f"{what} needs a frame of {need:,} bytes, over the limit of {limit:,} bytes on frames "
        f"to the nodes (the largest a connected node takes): raise {whose} REMAP_MAX_FRAME"
    )
