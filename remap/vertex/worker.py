"""A vertex worker: one long-running call of a gang function job, owning some partitions.

It keeps its partitions in memory and follows the driver's numbered commands, answering each
with an ack file. Messages to other workers' partitions are written as one file per
destination partition and superstep. It stops once its slot is another attempt's or the
driver is gone.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.layout import (
    DataDir,
    require_visible,
    storage_error,
    storage_trouble,
    vanished,
    write_atomic,
)
from ..shipping import load_function_blob, user_traceback
from .engine import (
    Outbox,
    Partition,
    VertexError,
    encode_bucket,
    fold_into,
    gather,
    kept_bucket,
    partition_of,
    prepare_line,
)
from .files import (
    PICKLE_PROTOCOL,
    Heartbeats,
    Layout,
    committed,
    read_lines,
    read_pickle,
    write_pickle,
)
from .program import Program

#: edges (and vertices) read for other workers' partitions before they are written out (each
#: chunk repeats ids the owner merges one by one: 4 chunks of 10^6 edges merge 2x slower than 1)
LOAD_SPILL = 1_000_000
#: messages a superstep holds (without a combiner) before they are written out, a file per
#: destination partition: a superstep sending many messages needs no memory for all of them
MESSAGE_SPILL = 1_000_000
POLL_MIN = 0.0005
POLL_MAX = 0.005  # a barrier noticed within 5 ms: a stat per poll costs next to nothing
GIVE_UP_INTERVAL = 0.1  # seconds between a waiting worker's looks at the driver's heartbeat
#: why a worker call returns at once, or stops, when its job's driver has cleaned up
ENDED = "the job has ended"


@dataclass(frozen=True)
class WorkerArgs:
    """The argument of one worker call (pickled by the client, the same for every attempt)."""

    data_dir: str
    job_id: str
    slot: int
    #: the Program, or (to a cluster) its cloudpickle: the user's functions travel by value
    program: Program | bytes
    heartbeat: float = 0.5  # seconds between heartbeats
    lost_after: float = 30.0  # the driver's heartbeat unchanged this long: give up


@dataclass
class Command:
    """One instruction of the driver to every member worker."""

    seq: int
    kind: str  # read | merge | restore | step | output | stop
    epoch: int
    members: dict[int, int]  # slot → attempt number
    owners: list[int]  # partition → slot
    superstep: int = 0
    splits: dict[int, list[tuple[int, str, int, int]]] = field(default_factory=dict)
    num_vertices: int = 0
    aggregated: dict[str, Any] = field(default_factory=dict)
    checkpoint: bool = False
    output: str = ""
    on_error: str = "fail"


class _Superseded(Exception):
    """This attempt's slot belongs to another attempt now, or the job is over for it."""


#: commands that build the partitions: millions of new lists and tuples, no cycles among them
LOADING = frozenset({"read", "merge", "restore"})


@contextlib.contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """Run without the cyclic garbage collector (its passes cost a tenth of a load, to free
    nothing), then freeze what was built (undone when the worker returns), else the next
    collections visit all of it once per generation."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


class Phases:
    """Wall and CPU seconds of this thread per phase of the work, reported with each ack."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in ``phase``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        spent = self.times.setdefault(phase, [0.0, 0.0])
        spent[0] += wall - self._wall
        spent[1] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def take(self) -> dict[str, list[float]]:
        """The phases marked since the last take."""
        times, self.times = self.times, {}
        return times


def wait_for(path: Path, give_up: Any, every: float = GIVE_UP_INTERVAL, quiet: float = 0.0) -> None:
    """Poll for ``path`` with a short, growing interval (one stat a poll); ``give_up()``,
    which may raise, runs every ``every`` seconds. For the first ``quiet`` seconds it polls
    only that often (each wake-up takes a CPU from a worker)."""
    name = str(path)
    delay = POLL_MIN
    checked = time.monotonic()
    quiet_until = checked + quiet
    while not os.path.exists(name):
        now = time.monotonic()
        if now - checked >= every:
            checked = now
            give_up()
        if now < quiet_until:
            time.sleep(min(every, quiet_until - now))
            continue
        time.sleep(delay)
        delay = min(POLL_MAX, delay * 2)


class Worker:
    def __init__(self, args: WorkerArgs, clock: Callable[[], float] = time.monotonic) -> None:
        self.args = args
        self.clock = clock  # times the driver's heartbeat (see Heartbeats)
        self.beats = Heartbeats()
        self.slot = args.slot
        program = args.program
        self.program: Program = (
            load_function_blob(program)[0] if isinstance(program, bytes) else program
        )
        self.data = DataDir(Path(args.data_dir))
        self.layout = Layout(self.data, args.job_id)
        self.attempt = 0  # claimed when it runs (Layout.claim_attempt): 1, 2, ...
        self.member = False
        self.parts: dict[int, Partition] = {}
        self.records: dict[int, Partition] = {}  # own partitions' records read by this worker
        self.local: dict[int, dict[int, Any]] = {}  # superstep → partition → bucket (or bytes)
        self.restored: dict[int, dict[Any, list[Any]]] = {}
        #: this worker's load made other partitions' records between its own (see _relayout)
        self.mixed = False
        self.stats = {"supersteps": 0, "bytes_written": 0, "bytes_read": 0}
        self.phases = Phases()
        self._stop = threading.Event()

    # ------------------------------------------------------------ liveness

    def _beat(self) -> None:
        """Touch this attempt's heartbeat until stopped; never make ``alive/`` (see run)."""
        path = self.layout.heartbeat(self.slot, self.attempt)
        while not self._stop.wait(self.args.heartbeat):
            try:
                os.utime(path)
            except FileNotFoundError:
                try:
                    path.touch()
                except FileNotFoundError:  # alive/ is gone: the job ended, its driver cleaned up
                    return

    def _check_driver(self) -> None:
        now = self.clock()
        path = self.layout.driver_heartbeat
        try:
            age = self.beats.age(str(path), path.stat(), now)
        except FileNotFoundError:
            age = 0.0
        if age > self.args.lost_after:
            raise _Superseded("the driver stopped answering")

    # ------------------------------------------------------------ main loop

    def run(self) -> dict[str, Any]:
        require_visible(self.data, self.args.job_id)  # one clear line if the mount is missing
        try:  # alive/ is gone once the job ended: a late call leaves nothing behind
            self.attempt = self.layout.claim_attempt(self.slot)
        except FileNotFoundError:
            return {"slot": self.slot, "attempt": self.attempt, "left": ENDED, **self.stats}
        beat = threading.Thread(target=self._beat, name="vertex-heartbeat", daemon=True)
        beat.start()
        try:
            seq = 0
            while True:
                wait_for(self.layout.command(seq), self._check_driver)
                cmd: Command = read_pickle(self.layout.command(seq))
                self.phases.mark("wait")
                if cmd.kind == "stop":
                    return {"slot": self.slot, "attempt": self.attempt, **self.stats}
                if cmd.members.get(self.slot) != self.attempt:
                    if self.member:
                        raise _Superseded("slot taken over after a rollback")
                    seq += 1
                    continue
                self.member = True
                ack = self._execute(cmd)
                try:
                    write_pickle(self.layout.ack(seq, self.slot), ack, parents=False)
                except OSError as exc:  # acks/ is gone: the job ended under this command
                    if not vanished(exc) or self.layout.acks.is_dir():
                        raise
                    raise _Superseded(ENDED) from None
                seq += 1
        except _Superseded as why:
            return {"slot": self.slot, "attempt": self.attempt, "left": str(why), **self.stats}
        finally:
            self._stop.set()
            gc.unfreeze()  # the core goes on with other jobs: its collector sees everything again

    def _execute(self, cmd: Command) -> dict[str, Any]:
        ack: dict[str, Any] = {"attempt": self.attempt, "seq": cmd.seq, "slot": self.slot}
        try:
            with gc_paused(cmd.kind in LOADING):
                ack.update(getattr(self, f"_do_{cmd.kind}")(cmd))
        except VertexError as exc:
            ack["error"] = str(exc)
            ack["traceback"] = user_traceback(exc)[-8000:]  # where the user's code raised
        except OSError as exc:  # its epoch's files went (a rollback, or the job's end): its
            # ack goes unread, and the next command says whether this worker is still a member
            if not vanished(exc) or self.layout.epoch(cmd.epoch).is_dir():
                raise
        self.phases.mark(cmd.kind)  # what a command did not mark itself
        ack["times"] = self.phases.take()
        return ack

    def _reset(self, cmd: Command) -> None:
        count = len(cmd.owners)
        self.parts = {
            p: Partition(p, count, self.program)
            for p, slot in enumerate(cmd.owners)
            if slot == self.slot
        }
        self.records = {}
        self.local = {}
        self.restored = {}
        self.mixed = False

    # ------------------------------------------------------------ commands

    def _do_read(self, cmd: Command) -> dict[str, Any]:
        """Parse this worker's splits into per-partition records; other workers' are written
        out every :data:`LOAD_SPILL` edges."""
        self._reset(cmd)
        count = len(cmd.owners)
        program = self.program
        acc = [Partition(p, count, program) for p in range(count)]
        held = records = chunk = 0

        def spill() -> None:
            nonlocal chunk
            for p in range(count):
                if p not in self.parts and acc[p].values:
                    blob = pickle.dumps(acc[p].pieces(), PICKLE_PROTOCOL)
                    path = self.layout.loaded(cmd.epoch, p) / message_file(self.slot, chunk)
                    self._write_scratch(path, blob)
                    acc[p] = Partition(p, count, program)
                    self.mixed = True
            chunk += 1

        skip = cmd.on_error == "continue"
        failed, first_error = 0, ""
        for split in cmd.splits.get(self.slot, ()):
            for line in read_lines(*split):
                try:
                    prepared = prepare_line(program, line)
                except VertexError as exc:
                    if not skip:
                        raise
                    failed += 1  # on_error: continue: the line is skipped and counted
                    first_error = first_error or str(exc)
                    continue
                for vid, value, targets, weights in prepared:
                    records += 1
                    p = partition_of(vid, count)
                    try:
                        acc[p].add(vid, value, targets, weights)
                    except TypeError as exc:  # an id that is no dict key (a list, a dict)
                        raise VertexError(
                            f"prepare({line!r}) returned vertex id {vid!r}: {exc}"
                        ) from None
                    if p not in self.parts:
                        held += 1 + len(targets)
                if held >= LOAD_SPILL:
                    spill()
                    held = 0
        spill()
        self.records = {p: acc[p] for p in self.parts}
        return {"records": records, "errors": failed, "first_error": first_error}

    def _do_merge(self, cmd: Command) -> dict[str, Any]:
        """Each own partition from every reader's records in input order: splits are in slot
        order, so chunks merged by (slot, chunk), with this worker's own in place, are."""
        for p in list(self.parts):
            own = self.records.pop(p)
            chunks = committed(self.layout.loaded(cmd.epoch, p))
            before = [c for c in chunks if int(c.name[4:9]) < self.slot]
            part = self.parts[p] if before else own
            for path in before:
                part.absorb(pickle.loads(self._read(path)))
            if before:
                part.absorb(own.pieces())
            del own
            for path in chunks[len(before) :]:
                part.absorb(pickle.loads(self._read(path)))
            self.parts[p] = part
        part = None
        if self.mixed:
            self._relayout()
        return {"vertices": sum(len(p) for p in self.parts.values())}

    def _relayout(self) -> None:
        """Build this worker's partitions again from their pickles, the old ones freed first:
        read between other workers' records (spilled since), their objects were strewn over
        twice the memory; rebuilt, they lie in order (supersteps 7-12 % cheaper)."""
        blobs = {p: pickle.dumps(part.pieces(), PICKLE_PROTOCOL) for p, part in self.parts.items()}
        for p in blobs:
            old = self.parts[p]
            self.parts[p] = Partition(p, old.count, self.program)
            del old
        for p, blob in blobs.items():
            self.parts[p].absorb(pickle.loads(blob))
        self.mixed = False

    def _do_restore(self, cmd: Command) -> dict[str, Any]:
        self._reset(cmd)
        for p, part in self.parts.items():
            self.restored[p] = part.restore(
                self._read(self.layout.part_checkpoint(cmd.epoch, cmd.superstep, p))
            )
        return {"vertices": sum(len(p) for p in self.parts.values())}

    def _inbox(self, cmd: Command, p: int) -> Any:
        if p in self.restored:
            return self.restored.pop(p)
        before = cmd.superstep - 1
        files = committed(self.layout.inbox(cmd.epoch, before, p))
        own = message_file(self.slot, 0)[:-6]  # this worker's spilled chunks: after the others
        files.sort(key=lambda f: f.name.startswith(own))  # (stable: in order otherwise)
        bucket = self.local.get(before, {}).pop(p, None)

        def sources() -> Iterator[Any]:
            """Each sender's files read as gather asks for them (never all at once), in
            sender order, then the messages this worker sent itself (spilled, then held)."""
            for f in files:
                yield self._read(f)
            if bucket:
                yield bucket

        return gather(self.parts[p], sources(), self.program.combine is not None)

    def _do_step(self, cmd: Command) -> dict[str, Any]:
        s = cmd.superstep
        count = len(cmd.owners)
        moved = 0

        def spill(p: int, chunk: int, bucket: dict[Any, list[Any]]) -> None:
            nonlocal moved
            path = self.layout.inbox(cmd.epoch, s, p) / message_file(self.slot, chunk)
            written = self._write_scratch(path, encode_bucket(bucket, False))
            if p not in self.parts:
                moved += written

        program = self.program
        outbox = Outbox(count, program.combine, program.fold, spill, MESSAGE_SPILL)
        ack: dict[str, Any] = {"active": 0, "sent": 0, "errors": 0, "first_error": ""}
        aggregates: dict[str, Any] = {}
        vertices = 0
        # a partition at a time: its inbox gathered, checkpointed, computed and let go before
        # the next one's is gathered (a worker given a lost one's partitions holds one inbox)
        for p, part in self.parts.items():
            inbox = self._inbox(cmd, p)
            self.phases.mark("receive")
            if cmd.checkpoint:
                self._write_scratch(self.layout.part_checkpoint(cmd.epoch, s, p), part.dump(inbox))
                self.phases.mark("checkpoint")
            st = part.step(s, inbox, outbox, cmd.num_vertices, cmd.aggregated, cmd.on_error)
            del inbox
            self.phases.mark("compute")
            ack["active"] += st.active
            ack["sent"] += st.sent
            ack["errors"] += st.errors
            ack["first_error"] = ack["first_error"] or st.first_error
            vertices += st.vertices
            fold_into(self.program.aggregators, aggregates, st.aggregates)
        self.local.pop(s - 1, None)
        outbox.finish()
        combined = outbox.combined
        local: dict[int, Any] = {}
        for p, bucket in enumerate(outbox.buckets):
            if not bucket:
                continue
            if p in self.parts:
                local[p] = kept_bucket(bucket, combined)
            else:
                path = self.layout.inbox(cmd.epoch, s, p) / message_file(self.slot, outbox.spills)
                moved += self._write_scratch(path, encode_bucket(bucket, combined))
        self.local[s] = local
        self.stats["supersteps"] += 1
        self.phases.mark("send")
        ack.update(
            delivered=sum(outbox.counts()),
            vertices=vertices,
            aggregates=aggregates,
            bytes_moved=moved,
        )
        return ack

    def _do_output(self, cmd: Command) -> dict[str, Any]:
        lines = 0
        for p, part in self.parts.items():
            text = "".join(line + "\n" for line in part.output_lines())
            lines += text.count("\n")
            self._write_file(
                Path(cmd.output) / f"part-{p:05d}", text.encode("utf-8", "surrogateescape")
            )
        return {"lines": lines}

    # ------------------------------------------------------------ files

    def _write_scratch(self, path: Path, blob: bytes) -> int:
        self._write_file(path, blob)
        self.stats["bytes_written"] += len(blob)
        return len(blob)

    @staticmethod
    def _write_file(path: Path, blob: bytes) -> None:
        """Write a whole file, making only its own folder, never the ones above it (the
        superstep's, the load's, a checkpoint's, the output's), which the driver makes before
        its command and removes when done or rolled back; a full disk is one line naming it."""
        try:
            write_atomic(path, blob, parents=False)
        except OSError as exc:
            if storage_trouble(exc):
                raise storage_error(path, exc) from None
            raise

    def _read(self, path: Path) -> bytes:
        blob = path.read_bytes()
        self.stats["bytes_read"] += len(blob)
        return blob


def message_file(slot: int, chunk: int) -> str:
    """The name of a sender's chunk of messages to one partition: names of one length, so
    :func:`committed` lists them by sender, then chunk (the order they were sent in)."""
    return f"from{slot:05d}-{chunk:06d}"


def run_worker(args: WorkerArgs) -> dict[str, Any]:
    """The function every worker call runs (shipped once per node, like any job function)."""
    return Worker(args).run()
