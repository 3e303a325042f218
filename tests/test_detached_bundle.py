"""What a detached data or vertex job carries to the server, and what its tasks print on the way
back: no sockets, no processes.

The ``drive`` message carries the job's module, its ``modules:`` (packages with their
submodules) and its ``files:`` as one tree (``remap.bundle``), bounded by the frame limit and
written on the server only under names that stay inside the job's new directory; the server
keeps the last bytes of the job's task output, which ``attach`` reads from an offset and the
HTTP job view shows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from protocol import messages as m
from protocol.framing import frame_length
from remap import bundle
from remap.client import ClusterClient
from remap.console import detached
from remap.errors import ConfigError
from remap.server import drivers as drivers_mod
from remap.server.drivers import MAX_OUTPUT, DriveError, DrivenJob, Drivers, shipped_tree
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_scheduler import FakeLink

# ============================================================================ names and limits


@pytest.mark.parametrize(
    "name",
    [
        "../x.py",
        "modules/../../x.py",
        "files/..",
        "/etc/passwd",
        "",
        ".",
        "modules//x.py",
        "modules/./x.py",
        "files/a\x00b",
        "/".join(["d"] * (bundle.MAX_DEPTH + 1)),
        "files/" + "x" * bundle.MAX_PATH,
        b"files/x",
        7,
    ],
)
def test_a_name_that_could_leave_the_directory_is_refused(name: Any) -> None:
    """Absolute paths, empty, ``.`` or ``..`` parts, NUL, too deep or too long, not text: each
    one a ValueError of one line, before anything is written."""
    with pytest.raises(ValueError) as caught:
        bundle.check_name(name)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["x.py", "modules/pkg/sub/m.py", "files/data set.csv", "a/.env"])
def test_a_name_inside_the_directory_is_kept(name: str) -> None:
    """Nested paths, spaces and dot files stay as they are."""
    assert bundle.check_name(name) == name


def test_a_package_and_files_travel_as_one_tree_named_in_the_job(tmp_path: Path) -> None:
    """``tree`` puts a package's submodules under ``modules/`` with their subpaths and files
    under ``files/``; the job's ``modules:`` and ``files:`` name them there; the packed tree
    unpacks to the same bytes."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py"):
        (tmp_path / "pkg" / name).write_text(f"# {name}\n")
    (tmp_path / "one.py").write_text("X = 1\n")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    shipped = bundle.collect(["pkg", "one.py"], ["data.bin"], tmp_path)
    entries, modules, files = bundle.tree(shipped)
    assert sorted(entries) == [
        "files/data.bin",
        "modules/one.py",
        "modules/pkg/__init__.py",
        "modules/pkg/a.py",
        "modules/pkg/sub/__init__.py",
        "modules/pkg/sub/b.py",
    ]
    assert modules == ["modules/one.py", "modules/pkg"] and files == ["files/data.bin"]
    assert bundle.unpack_tree(bundle.pack_tree(entries)) == entries
    assert bundle.pack_tree({}) == b"" and bundle.unpack_tree(b"") == {}


@pytest.mark.parametrize(
    "payload, why",
    [
        (msgpack.packb({"files/a": b"x" * 11}), "add up to 11 bytes, over 10"),
        (
            msgpack.packb({f"files/{i}": b"" for i in range(bundle.MAX_ENTRIES + 1)}),
            "10,001 entries, over 10,000",
        ),
        (msgpack.packb(["files/a", b"x"]), "not a bundle tree"),
        (msgpack.packb({"files/a": "text"}), "is not bytes"),
        (msgpack.packb({"files/../../a": b"x"}), "leaves the job directory"),
        (msgpack.packb({1: b"x"}), "not a bundle tree"),
        (b"\xc1 not msgpack", "not a bundle tree"),
    ],
)
def test_a_tree_over_its_limits_or_not_a_tree_is_refused(payload: bytes, why: str) -> None:
    """Bytes in all, entries, shape, value types and names: each refused with one line."""
    with pytest.raises(ValueError, match=why):
        bundle.unpack_tree(payload, limit=10)


@pytest.mark.parametrize("count", [1, 15, 16, 300])
def test_every_length_form_msgpack_writes_reads_back(count: int) -> None:
    """Names and bytes at the edges of msgpack's length forms (fix, 8, 16, 32 bits), in maps of
    each form, come back as packed."""
    sizes = [0, 31, 32, 255, 256, 65535, 65536]
    entries = {
        f"files/{i}-" + "n" * (sizes[i % 5] % 200): bytes([i % 251]) * sizes[i % len(sizes)]
        for i in range(count)
    }
    entries["files/" + "L" * 300] = b"z"  # a name over 255 bytes: str16
    assert bundle.unpack_tree(bundle.pack_tree(entries)) == entries


def test_a_tree_is_refused_before_anything_it_declares_is_built() -> None:
    """A hostile ``drive`` payload costs the server no more memory than its own bytes: nested
    arrays declaring their whole payload's length each (msgpack built a list of each declared
    length before refusing: 78 MiB for this 64 KiB), a map declaring 4 G entries, a payload
    larger than any tree, a name twice, bytes after the map: each one line, at once."""
    import struct
    import tracemalloc

    nested = b"\x81\xa7files/a" + (b"\xdd" + struct.pack(">I", 1 << 16)) * 2000
    nested += b"\xc0" * ((1 << 16) - len(nested))
    cases = [
        (nested, "is not bytes"),
        (b"\xdf\xff\xff\xff\xff", "entries, over 10,000"),
        (b"\x81\xa1a" + b"\xc6" + struct.pack(">I", 1 << 30), "runs past its end"),
        (b"\x82\xa8files/ab\xc4\x00\xa8files/ab\xc4\x00", "named twice"),
        (msgpack.packb({"files/a": b"x"}) + b"\xc0", "1 bytes after its map"),
    ]
    for payload, why in cases:
        tracemalloc.start()
        with pytest.raises(ValueError, match=why) as caught:
            bundle.unpack_tree(payload)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * 1024, (why, peak)
        assert "\n" not in str(caught.value)
    oversize = bytearray(bundle.MAX_BUNDLE + bundle.MAX_ENTRIES * 1100)
    with pytest.raises(ValueError, match="bytes packed, over"):
        bundle.unpack_tree(oversize)


def test_a_tree_of_deep_distinct_paths_is_refused_before_a_directory_is_made(
    tmp_path: Path,
) -> None:
    """10,000 names 31 directories deep, none shared: a 2.3 MB payload that made 300,001
    directories in 17 s; over MAX_DIRS directories it is one line from unpack_tree and from
    write_tree (a node's bundle), and nothing is made."""
    entries = {
        "files/" + "/".join(f"{i}x{j}" for j in range(30)) + "/f": b"" for i in range(10_000)
    }
    with pytest.raises(ValueError, match="over 10,000 directories"):
        bundle.unpack_tree(bundle.pack_tree(entries))
    with pytest.raises(ValueError, match="over 10,000 directories"):
        bundle.write_tree(tmp_path, entries)
    assert list(tmp_path.iterdir()) == []
    shared = {f"modules/pkg/sub/m{i}.py": b"" for i in range(10_000)}  # few directories
    assert bundle.unpack_tree(bundle.pack_tree(shared)) == shared


def test_write_tree_never_writes_through_a_link_or_over_a_file(tmp_path: Path) -> None:
    """A directory that holds a link where a tree's directory would go is refused, nothing
    written where the link points; a name given as a file and as a directory is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "job"
    target.mkdir()
    (target / "modules").symlink_to(outside)
    with pytest.raises(ValueError, match="crosses a file"):
        bundle.write_tree(target, {"modules/evil.py": b"x"})
    (target / "files").mkdir()
    (target / "files" / "a.txt").symlink_to(outside / "a.txt")
    with pytest.raises(ValueError, match="named twice"):
        bundle.write_tree(target, {"files/a.txt": b"x"})
    assert list(outside.iterdir()) == []
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(ValueError, match="crosses a file"):
        bundle.write_tree(fresh, {"files/a": b"1", "files/a/b": b"2"})
    bundle.write_tree(fresh, {"modules/p/q/r.py": b"R", "x.py": b"X"})
    assert (fresh / "modules/p/q/r.py").read_bytes() == b"R"


# ============================================================================ the server's side


@pytest.mark.parametrize(
    "name",
    [
        "notes.txt",
        "job.json",
        "owner",
        "modules",
        "files",
        "other/x.py",
        "../x.py",
        "/x.py",
        "x.py\n",
    ],
)
def test_the_server_takes_the_jobs_module_at_the_top_and_the_rest_below_its_roots(
    name: str,
) -> None:
    """A shipped name is the job's ``NAME.py`` or lies under ``modules/`` or ``files/``: one
    cannot replace ``job.json`` or ``owner``, or leave the directory."""
    with pytest.raises(DriveError, match="expected NAME.py|leaves the job directory"):
        shipped_tree({}, bundle.pack_tree({name: b"x"}))


def test_the_older_files_field_still_ships_single_modules() -> None:
    """A console of before (``files``: NAME.py → text) is still understood."""
    assert shipped_tree({"wc.py": "X = 1\n"}, b"") == {"wc.py": b"X = 1\n"}
    for name in ("../wc.py", "wc.py\n"):  # (a regex's "$" matched before a last newline)
        with pytest.raises(DriveError, match="expected NAME.py: text"):
            shipped_tree({name: "X"}, b"")


class _Scheduler:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ids = iter(range(1, 100))

    def take_job_id(self) -> int:
        return next(self.ids)


class _Pool:
    """A thread pool that runs its work at once (the directory is written before start
    returns)."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:  # noqa: N802
        try:
            result = f(*args)
        except Exception:  # noqa: BLE001 - handed on as a thread pool does
            on_result(False, Failure())
        else:
            on_result(True, result)


class _Reactor(Clock):
    def getThreadPool(self) -> _Pool:  # noqa: N802 - Twisted's name
        return _Pool()

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
        f(*args)


def _drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Drivers, list[DrivenJob]]:
    clock = _Reactor()
    started: list[DrivenJob] = []
    drivers = Drivers(
        clock, _Scheduler(clock), data_dir=tmp_path, cluster_address="x:1", child_env={}
    )
    monkeypatch.setattr(drivers, "_spawn", started.append)
    return drivers, started


def _job(kind: str = "mapreduce") -> str:
    return json.dumps({"kind": kind, "module": "wc.py", "input": ["/in"], "output": "/out"})


def test_a_data_directory_everyone_may_write_runs_no_detached_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver imports the job's modules from the data directory on the server's machine:
    with one everyone may write, a detached job is refused in one line, nothing written."""
    drivers, started = _drivers(tmp_path, monkeypatch)
    tmp_path.chmod(0o777)
    try:
        with pytest.raises(DriveError, match="cannot be used: it is writable by everyone"):
            drivers.start("mapreduce", "wc", _job(), {}, "", bundle.pack_tree({"wc.py": b""}))
    finally:
        tmp_path.chmod(0o700)
    assert started == [] and not (tmp_path / "detached").exists()


def test_a_stale_directory_under_the_new_id_is_replaced_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's directory is written whole into a new directory and renamed into place: a
    directory an earlier server left under that id (no journal: ids start again), with a link
    planted where ``modules/`` goes, is replaced, and nothing is written where it points."""
    drivers, started = _drivers(tmp_path, monkeypatch)
    outside = tmp_path / "outside"
    outside.mkdir()
    stale = tmp_path / "detached" / "1"
    stale.mkdir(parents=True)
    (stale / "modules").symlink_to(outside)
    (stale / "ended.json").write_text("{}")
    tree = {"wc.py": b"import pkg\n", "modules/pkg/__init__.py": b"", "files/a.csv": b"1,2\n"}
    jobs: list[DrivenJob] = []
    drivers.start("mapreduce", "wc", _job(), {}, "", bundle.pack_tree(tree)).addCallback(
        jobs.append
    )
    (job,) = jobs
    assert started == [job] and job.directory == stale
    assert list(outside.iterdir()) == []
    assert not (stale / "modules").is_symlink() and not (stale / "ended.json").exists()
    assert (stale / "modules/pkg/__init__.py").is_file()
    assert (stale / "files/a.csv").read_bytes() == b"1,2\n"
    assert json.loads((stale / "job.json").read_text())["name"] == "wc"
    assert [p.name for p in (tmp_path / "detached").iterdir()] == ["1"]  # no staging left


def _console_handler(drivers: Drivers) -> tuple[ServerConnection, FakeLink]:
    factory = RemapServerFactory(drivers.reactor, b"k" * 32, max_frame=1 << 20)
    factory.use_drivers(drivers)
    drivers.scheduler = factory.scheduler
    handler = ServerConnection(factory)
    handler.role = "console"
    return handler, FakeLink("console")


def test_drive_refuses_a_hostile_tree_with_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``drive`` whose payload names ``../`` gets ``error(failed)`` naming the entry; no
    job directory is made and no driver starts."""
    drivers, started = _drivers(tmp_path, monkeypatch)
    handler, console = _console_handler(drivers)
    hostile = bundle.pack_tree({"wc.py": b"", "files/../../../evil": b"x"})
    msg = m.Drive(id=3, kind="mapreduce", name="wc", job=_job(), payload=hostile)
    handler.message_received(console, msg)
    (error,) = console.of(m.Error)
    assert error.code == "failed" and "leaves the job directory" in error.message
    assert started == [] and not (tmp_path / "detached").exists()


def test_a_job_directory_that_cannot_be_written_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory is written off the reactor thread; when that fails (here the data
    directory is a file) the console's ``drive`` gets ``error(failed)`` with the reason."""
    (tmp_path / "detached").write_text("not a directory")
    drivers, started = _drivers(tmp_path, monkeypatch)
    handler, console = _console_handler(drivers)
    msg = m.Drive(id=4, kind="mapreduce", name="wc", job=_job(), payload=b"")
    handler.message_received(console, msg)
    (error,) = console.of(m.Error)
    assert error.code == "failed" and error.message.startswith("cannot write the job's directory")
    assert started == [] and drivers.jobs == {}


# ============================================================================ frame limit


class _Conn:
    send_limit = 4096


class _Link:
    def __init__(self) -> None:
        self.conn, self.sent = _Conn(), []

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)


def test_a_drive_over_the_frame_limit_fails_here_naming_its_size_and_the_setting() -> None:
    """The console refuses a ``drive`` larger than the server takes (its frame limit) with one
    line naming the size, the limit and REMAP_MAX_FRAME; nothing is sent (the server would
    have closed the connection)."""
    client = ClusterClient()
    client.link = _Link()
    errors: list[Any] = []
    client.drive("mapreduce", "wc", _job(), bundle.pack_tree({"files/small": b"x"}))
    assert len(client.link.sent) == 1
    big = bundle.pack_tree({"files/big": b"x" * 5000})
    d = client.drive("mapreduce", "wc", _job(), big)
    d.addErrback(errors.append)
    assert len(client.link.sent) == 1 and len(errors) == 1
    error = errors[0].value
    size = frame_length(
        *m.encode(m.Drive(id=2, kind="mapreduce", name="wc", job=_job(), payload=big))
    )
    assert isinstance(error, ConfigError)
    text = str(error)
    assert "\n" not in text and f"is {size:,} bytes, over the 4,096 bytes" in text
    assert "REMAP_MAX_FRAME" in text


# ============================================================================ task output


def test_the_server_keeps_the_last_bytes_of_a_jobs_task_output() -> None:
    """Output beyond MAX_OUTPUT pushes out the oldest; a reader at an offset gets what came
    after it, or where the kept part starts when what it missed is gone; a batch the driver
    dropped is marked in the text."""
    job = DrivenJob(1, "mapreduce", "wc", "", Path("."), 0.0)
    job.add_output("a" * 1000)
    assert job.task_output(0) == {
        "task_output": "a" * 1000,
        "task_output_from": 0,
        "task_output_end": 1000,
    }
    assert job.task_output(400)["task_output"] == "a" * 600
    assert job.task_output(5000)["task_output"] == ""  # a reader ahead of the job: nothing
    job.add_output("b" * MAX_OUTPUT)
    seen = job.task_output(400)
    assert seen["task_output_from"] == 1000 and seen["task_output"] == "b" * MAX_OUTPUT
    assert len(job.printed) == MAX_OUTPUT
    job.add_output("c\n", dropped=12345)
    tail = job.task_output(job.printed_end - 100)["task_output"]
    assert tail.endswith("[12,345 characters of task output dropped]\nc\n")


def test_drive_then_attach_reads_the_task_output_from_an_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's ``output`` lines are kept per job; ``attach`` of a detached job answers
    with its status map and the output from ``since`` on (it was refused before)."""
    drivers, started = _drivers(tmp_path, monkeypatch)
    handler, console = _console_handler(drivers)
    tree = bundle.pack_tree({"wc.py": b""})
    handler.message_received(
        console, m.Drive(id=1, kind="mapreduce", name="wc", job=_job(), payload=tree)
    )
    (ok,) = console.of(m.Ok)
    (job,) = started
    assert ok.info == {"job": job.id}
    for text in ("[n core 0] one\n", "[n core 1] two\n"):
        drivers.event(job, json.dumps({"event": "output", "text": text, "dropped": 0}).encode())
    handler.message_received(console, m.Attach(id=2, job=job.id))
    info = console.of(m.Ok)[-1].info
    assert info["state"] == "running" and info["kind"] == "mapreduce"
    assert info["task_output"] == "[n core 0] one\n[n core 1] two\n"
    assert info["output"] == "/out"  # the status map's own output (the job's output path)
    handler.message_received(console, m.Attach(id=3, job=job.id, since=15))
    assert console.of(m.Ok)[-1].info["task_output"] == "[n core 1] two\n"
    assert console.of(m.Ok)[-1].info["task_output_end"] == 30


class _Out:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def test_the_driver_sends_task_output_in_bounded_batches() -> None:
    """However much the tasks print, no ``output`` line holds more than OUTPUT_BATCH
    characters; what it leaves out is counted, the newest text is kept, and closing sends
    what is left."""
    out = _Out()
    sender = detached._TaskOutput(out)  # type: ignore[arg-type]
    chunk = "x" * 999 + "\n"
    for _ in range(100):
        sender.put(0, chunk)
    sender.put(0, "last\n")
    sender.close()
    assert out.lines and all(line["event"] == "output" for line in out.lines)
    assert all(len(line["text"]) <= detached.OUTPUT_BATCH for line in out.lines)
    assert sum(len(line["text"]) + line["dropped"] for line in out.lines) == 100_005
    assert out.lines[-1]["text"].endswith(chunk + "last\n")
    assert not sender.thread.is_alive()


def test_output_log_is_written_when_the_driver_ends(tmp_path: Path) -> None:
    """The kept output lands in the job's directory as ``output.log`` with ``ended.json``."""
    drivers_mod._after_driver(tmp_path, {"state": "done"}, tmp_path, "mapreduce", None, "", b"hi\n")
    assert (tmp_path / drivers_mod.OUTPUT_LOG).read_bytes() == b"hi\n"
    assert (tmp_path / "ended.json").exists()


class _Client:
    def __init__(self) -> None:
        self.drives: list[tuple] = []

    def drive(self, kind: str, name: str, job: str, shipped: bytes) -> int:
        self.drives.append((kind, name, job, shipped))
        return 9


class _Cluster:
    embedded = False

    def __init__(self, shipped: bundle.Bundle) -> None:
        self.bundle, self._client = shipped, _Client()


def test_the_python_apis_detach_ships_the_handles_modules_and_files(tmp_path: Path) -> None:
    """``remap.connect(modules=[pkg], files=[...])`` then ``cluster.mapreduce(..., detach=True)``:
    the ``drive`` carries the job's module at the top, the package with its subpaths and the
    file, and the job names them (a package was refused: 'is a package')."""
    from remap.jobfile import load_module

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a b\n")
    (tmp_path / "apkg" / "sub").mkdir(parents=True)
    (tmp_path / "apkg" / "__init__.py").write_text("")
    (tmp_path / "apkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "apkg" / "sub" / "low.py").write_text("def f(x):\n    return x.lower()\n")
    (tmp_path / "stop.txt").write_text("a\n")
    (tmp_path / "wcapi.py").write_text(
        "def map(line):\n    for w in line.split():\n        yield w, 1\n\n\n"
        "def reduce(w, c):\n    yield w, sum(c)\n"
    )
    module, _ = load_module("wcapi.py", tmp_path)
    cluster = _Cluster(bundle.collect(["apkg"], ["stop.txt"], tmp_path))
    handle = detached.drive_module(
        cluster, "mapreduce", module, tmp_path / "in", tmp_path / "out", {"reducers": 1}
    )
    assert handle.id == 9
    ((kind, name, job_text, shipped),) = cluster._client.drives
    job = json.loads(job_text)
    assert kind == "mapreduce" and name == "wcapi" and job["module"] == "wcapi.py"
    assert job["modules"] == ["modules/apkg"] and job["files"] == ["files/stop.txt"]
    assert sorted(bundle.unpack_tree(shipped)) == [
        "files/stop.txt",
        "modules/apkg/__init__.py",
        "modules/apkg/sub/__init__.py",
        "modules/apkg/sub/low.py",
        "wcapi.py",
    ]


def test_a_job_written_while_the_server_stops_starts_no_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop`` while a job's directory is being written (on a thread): the write's end
    starts no driver (it would outlive the server, and a restarted server would run the job
    a second time beside it), the directory goes, and the console is told why in one line;
    a ``drive`` after ``stop`` is refused at once."""
    drivers, started = _drivers(tmp_path, monkeypatch)
    pending: list[Any] = []

    class _LaterPool:
        def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:  # noqa: N802
            pending.append(lambda: on_result(True, f(*args)))

    monkeypatch.setattr(drivers.reactor, "getThreadPool", lambda: _LaterPool())
    d = drivers.start("mapreduce", "wc", _job(), {"wc.py": "X = 1\n"}, "")
    drivers.stop()
    (write,) = pending
    write()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert started == [] and drivers.jobs == {}
    (failure,) = failures
    assert failure.check(DriveError) and "the server is stopping" in str(failure.value)
    assert list((tmp_path / "detached").iterdir()) == []
    with pytest.raises(DriveError, match="the server is stopping"):
        drivers.start("mapreduce", "wc", _job(), {"wc.py": "X = 1\n"}, "")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["json.py", "heapq.py"])
def test_a_job_module_named_as_a_standard_module_does_not_replace_it_in_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    """The driver runs in the job's directory, where the job's module is NAME.py: ``python -m``
    put that directory first on sys.path, so a job module named ``json.py`` (or ``heapq.py``,
    ``queue.py`` ...) was imported by the driver in place of the standard one (it stopped
    with that module's own exit, never saying how the job ended). Started as the server starts
    it, the driver now loads the job's module only as the job's, and reports its end."""
    import subprocess
    import sys

    spawned: list[tuple[list[str], dict[str, str], str]] = []
    drivers, _ = _drivers(tmp_path, monkeypatch)
    monkeypatch.setattr(drivers, "_spawn", Drivers._spawn.__get__(drivers))  # the real one
    monkeypatch.setattr(
        drivers_mod,
        "spawn_console_child",
        lambda reactor, proto, args, child_env, path, **env: spawned.append((args, env, path)),
    )
    text = 'raise SystemExit("the job module replaced the standard one")\n'
    job = json.dumps({"kind": "mapreduce", "module": module, "input": ["/in"], "output": "/out"})
    started = drivers.start(
        "mapreduce", "wc", job, {}, "", bundle.pack_tree({module: text.encode()})
    )
    driven = started.result
    ((args, env, path),) = spawned
    assert path == str(driven.directory)
    full = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    done = subprocess.run(
        [sys.executable, *args], env={**full, **env}, cwd=path, capture_output=True, timeout=120
    )
    assert b"replaced the standard one" not in done.stderr.split(b"error while importing")[0]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events and events[-1]["event"] == "end" and events[-1]["state"] == "failed"
    assert "error while importing" in events[-1]["message"], events[-1]


def test_a_crashed_servers_half_written_job_directories_go_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed while it wrote a job's directory leaves ``.ID-xxxxxxxx`` under
    ``detached/``: the next server removes it at start. A job's own directory, a dot-name not
    of that pattern, and a staging directory being written now (its ``flock`` held) stay."""
    import fcntl

    detached = tmp_path / "detached"
    stale = detached / ".7-ab_cd12x"
    (stale / "modules").mkdir(parents=True)
    (stale / "wc.py").write_text("X = 1\n")
    live_job = detached / "7"
    live_job.mkdir()
    (live_job / "job.json").write_text("{}")
    other = detached / ".keep"
    other.mkdir()
    writing = detached / ".8-zz99zz99"
    writing.mkdir()
    held = os.open(writing, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        _drivers(tmp_path, monkeypatch)
        assert sorted(p.name for p in detached.iterdir()) == [".8-zz99zz99", ".keep", "7"]
        assert (live_job / "job.json").read_text() == "{}"
    finally:
        os.close(held)
    assert drivers_mod.remove_stale_staging(detached) == [".8-zz99zz99"]


def test_a_job_directory_is_locked_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the server writes a job's directory it holds the staging directory's ``flock``,
    so a server starting on the same data directory meanwhile leaves that write alone."""
    drivers, started = _drivers(tmp_path, monkeypatch)
    seen: list[list[str]] = []
    write_tree = bundle.write_tree

    def writing(directory: Path, entries: dict[str, bytes]) -> None:
        seen.append(drivers_mod.remove_stale_staging(directory.parent))
        write_tree(directory, entries)

    monkeypatch.setattr(bundle, "write_tree", writing)
    drivers.start("mapreduce", "wc", _job(), {"wc.py": "X = 1\n"}, "")
    assert seen == [[]] and len(started) == 1
    assert [p.name for p in (tmp_path / "detached").iterdir()] == ["1"]
