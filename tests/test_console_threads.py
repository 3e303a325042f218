"""The console runs user code and blocking output on its own thread, never the reactor's
(issue 10, item 1). In an embedded cluster the reactor thread is also the server's and the
node's: a slow reduce or a slow disk there would stall heartbeats and scheduling.
"""

from __future__ import annotations

import io
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from remap import runtime
from remap.console.main import Console, build_parser
from remap.console.session import Session
from remap.settings import Settings
from remap.sinks import ReduceSink, SqliteSink
from tests.cluster_harness import jobs_function, write_job


@pytest.mark.slow
def test_no_reduce_and_no_sink_write_runs_on_the_reactor_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reduce job and a sqlite job on an embedded cluster: the user's reduce function (it
    records its own thread) and every write of the sqlite and reduce sinks run on the
    console's thread. Before, all of them ran on the reactor thread."""
    probe = tmp_path / "reduce-threads.log"
    monkeypatch.setenv("THREAD_PROBE", str(probe))  # the cores' calls write other pids
    sink_threads: list[tuple[str, int]] = []

    def recording(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            sink_threads.append((f"{cls.__name__}.{name}", threading.get_ident()))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for name in ("_add", "add_results", "flush", "_close"):
        recording(SqliteSink, name)
    for name in ("_add", "add_partial", "close"):
        recording(ReduceSink, name)

    reduce_job = write_job(
        tmp_path / "reduce.yaml",
        {
            "function": jobs_function("probe_funcs", "square"),
            "args_range": [0, 300],
            "response_mode": "reduce",
            "reduce": "add",
            "chunksize": 10,
        },
    )
    sqlite_job = write_job(
        tmp_path / "sqlite.yaml",
        {
            "function": jobs_function("probe_funcs", "square"),
            "args_range": [0, 300],
            "response_mode": "sqlite",
            "output": str(tmp_path / "out.sqlite"),
        },
    )
    session = Session(Settings(cores=1))
    out = io.StringIO()
    console = Console(session, out=out, err=io.StringIO())
    parser = build_parser()
    try:
        assert console.execute(parser.parse_args(["compute", str(reduce_job)])) == 0
        assert console.execute(parser.parse_args(["compute", str(sqlite_job)])) == 0
        reactor_thread = runtime.run(threading.get_ident, timeout=10)
    finally:
        session.close()
    assert out.getvalue().splitlines()[0] == str(sum(i * i for i in range(300)))
    with sqlite3.connect(tmp_path / "out.sqlite") as db:
        assert db.execute("select count(*) from results").fetchone()[0] == 300

    here = threading.get_ident()
    mine = [
        int(ident)
        for pid, ident in (line.split() for line in probe.read_text().splitlines())
        if int(pid) == os.getpid()
    ]
    assert mine, "the console folded nothing itself"
    assert reactor_thread not in mine, "the user's reduce ran on the reactor thread"
    assert set(mine) == {here}
    called = {name for name, _ in sink_threads}
    assert {"SqliteSink.add_results", "SqliteSink._close", "ReduceSink.close"} <= called
    on_reactor = sorted({name for name, ident in sink_threads if ident == reactor_thread})
    assert not on_reactor, f"sink calls on the reactor thread: {on_reactor}"
    assert {ident for _, ident in sink_threads} == {here}
