"""The data directory's layout and its commit helpers (no cluster needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remap.data import layout
from remap.data.layout import DataDir
from remap.errors import ConfigError


def test_paths_follow_the_documented_layout(tmp_path: Path) -> None:
    """Every path the layout promises, spelled exactly as the README says."""
    data = DataDir(tmp_path)
    job = "20261201-111500-abcdef"
    assert data.jobconfig(job) == tmp_path / "job" / job / "jobconfig.json"
    assert data.app_dir(job) == tmp_path / "job" / job / "app"
    assert data.progress_file(job, layout.task_name("mapper", 3), "h-1-aa") == (
        tmp_path / "im" / job / "progress" / "mapper-0003.h-1-aa.json"
    )
    assert data.consolidated(job) == tmp_path / "job" / job / "consolidated-progress.json"
    assert data.result_file(job) == tmp_path / "job" / job / "result"
    assert data.run_path(job, "default", 2, 7, 1, "h-1-aa") == (
        tmp_path / "im" / job / "default" / "reducer-0002" / "mapper-0007-part-00001.h-1-aa"
    )
    out = tmp_path / "out"
    assert layout.output_part(out, "bylength", 12) == out / "bylength" / "reducer-0012-part-00000"


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", ".hidden", "x y", "a" * 200])
def test_names_that_could_escape_are_refused(tmp_path: Path, bad: str) -> None:
    """A purpose or job id is a path component: traversal or odd names are a ConfigError."""
    with pytest.raises(ConfigError):
        DataDir(tmp_path).run_dir("job1", bad, 0)
    with pytest.raises(ConfigError):
        DataDir(tmp_path).job_dir(bad)


def test_from_setting_defaults_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No REMAP_DATA_DIR: ~/.remap/data, made absolute."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DataDir.from_setting(None).root == (tmp_path / ".remap" / "data").resolve()
    assert DataDir.from_setting("rel").root.is_absolute()


def test_write_atomic_leaves_no_temporary_and_replaces(tmp_path: Path) -> None:
    """A whole-file write creates parents, replaces the old content and leaves no .tmp."""
    target = tmp_path / "a" / "b.json"
    layout.write_json(target, {"x": 1})
    layout.write_json(target, {"x": 2})
    assert layout.read_json(target) == {"x": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.json"]
    assert layout.read_json(tmp_path / "missing.json") is None


def test_write_atomic_failure_removes_its_temporary(tmp_path: Path) -> None:
    """A write that fails midway leaves the old file and no stray."""
    target = tmp_path / "f"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        layout.write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_commit_and_strays(tmp_path: Path) -> None:
    """An attempt's tmp file is committed by rename; uncommitted ones are removed as strays."""
    final = tmp_path / "d" / "part"
    final.parent.mkdir()
    tmp = layout.tmp_path(final, "att1")
    tmp.write_bytes(b"data")
    stray = layout.tmp_path(final, "att2")
    stray.write_bytes(b"partial")
    layout.commit(tmp, final)
    assert final.read_bytes() == b"data" and not tmp.exists()
    assert layout.remove_strays(tmp_path) == [stray]
    assert sorted(p.name for p in final.parent.iterdir()) == ["part"]


def test_result_files(tmp_path: Path) -> None:
    """``result`` holds one word; ``result.json`` the word with details; bad states refused."""
    data = DataDir(tmp_path)
    assert layout.read_result(data, "j1") is None
    layout.write_result(data, "j1", "INCOMPLETE")
    layout.write_result(data, "j1", "OK", counters={"records": 3})
    assert data.result_file("j1").read_text() == "OK\n"
    assert layout.read_json(data.result_json("j1")) == {"state": "OK", "counters": {"records": 3}}
    with pytest.raises(ValueError):
        layout.write_result(data, "j1", "DONE")


def test_visibility_check_names_the_host_and_directory(tmp_path: Path) -> None:
    """A node without the job's config gets one line saying what to mount."""
    data = DataDir(tmp_path)
    with pytest.raises(layout.DataDirNotShared, match="REMAP_DATA_DIR"):
        layout.require_visible(data, "j1")
    layout.write_json(data.jobconfig("j1"), {})
    layout.require_visible(data, "j1")


def test_ids_are_distinct_and_valid() -> None:
    """Job ids and attempt tokens never collide in practice and are valid path components."""
    ids = {layout.new_job_id() for _ in range(50)}
    tokens = {layout.attempt_token() for _ in range(50)}
    assert len(ids) == 50 and len(tokens) == 50
    for job in ids:
        layout.check_name("job id", job)
    assert all(os.sep not in t for t in tokens)


def _scratch(data: DataDir, job: str) -> Path:
    run = data.run_dir(job, "default", 0)
    run.mkdir(parents=True)
    (run / "mapper-0000-part-00000.h-1-aa").write_bytes(b"k\tv\n")
    return data.im_dir(job)


def test_scratch_of_a_dead_driver_goes_a_running_jobs_stays(tmp_path: Path) -> None:
    """``remove_orphan_scratch`` removes ``im/<jobid>`` only where the job's ``driver.lock``
    is there and nobody holds it; a job whose driver holds it, and a job without the file
    (an earlier release's, or one starting), keep their scratch."""
    data = DataDir(tmp_path)
    running = layout.JobLock(data, "20261202-170000-aaaaaa")
    running.acquire()
    live = _scratch(data, running.job_id)
    dead = layout.JobLock(data, "20261202-170000-bbbbbb")
    dead.acquire()
    orphan = _scratch(data, dead.job_id)
    dead.release()  # as a SIGKILL would: the scratch is still there, so the file stays
    assert dead.path.exists()
    unlocked = _scratch(data, "20261202-170000-cccccc")
    assert layout.remove_orphan_scratch(data) == [dead.job_id]
    assert live.is_dir() and unlocked.is_dir() and not orphan.exists()
    assert not dead.path.exists() and running.path.exists()
    assert layout.read_result(data, running.job_id) is None  # only scratch is touched
    with pytest.raises(ConfigError, match="already running"):
        layout.JobLock(data, running.job_id).acquire()
    layout.remove_tree(live)
    running.release()  # nothing left to sweep: the file goes
    assert not running.path.exists()
    assert layout.remove_orphan_scratch(data) == []


@pytest.mark.slow
def test_a_sigkilled_drivers_scratch_is_removed_by_the_next_sweep(tmp_path: Path) -> None:
    """A process holding a job's lock with scratch written is SIGKILLed: while it lives the
    sweep leaves its ``im/<jobid>``; once dead, the sweep removes it."""
    import signal
    import subprocess
    import sys

    data = DataDir(tmp_path)
    job = "20261202-170000-dddddd"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from remap.data import layout\n"
        f"data = layout.DataDir(Path({str(tmp_path)!r}))\n"
        f"layout.JobLock(data, {job!r}).acquire()\n"
        f"data.run_dir({job!r}, 'default', 0).mkdir(parents=True)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert layout.remove_orphan_scratch(data) == []
        assert data.im_dir(job).is_dir()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdin is not None
        child.stdin.close()
        assert child.stdout is not None
        child.stdout.close()
    assert layout.remove_orphan_scratch(data) == [job]
    assert not data.im_dir(job).exists() and not (data.root / "im" / job).exists()
