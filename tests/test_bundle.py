"""Jobs that carry their modules and files, and jobs that require modules on the node."""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import pytest

from protocol import messages as m
from remap import bundle
from remap.errors import ConfigError
from remap.jobfile import load_job
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_scheduler import FakeLink

HELPERS = "def twice(x):\n    return 2 * x\n"
JOB = """\
import helpers
import shippedpkg.sub

import remap


def use(x):
    text = remap.job_file("data.txt").read_text()
    return helpers.twice(x) + shippedpkg.sub.K + len(text)
"""


def make_job_dir(root: Path, extra: str = "") -> Path:
    """A job directory: job.py imports helpers.py and a package, reads a shipped data file."""
    d = root / "jobdir"
    (d / "shippedpkg").mkdir(parents=True)
    (d / "helpers.py").write_text(HELPERS)
    (d / "shippedpkg" / "__init__.py").write_text("")
    (d / "shippedpkg" / "sub.py").write_text("K = 100\n")
    (d / "data.txt").write_text("abc")
    (d / "job.py").write_text(JOB)
    (d / "job.yaml").write_text(
        "function: job.py:use\n"
        "args_range: [0, 40]\n"
        "chunksize: 3\n"
        "modules: [helpers.py, shippedpkg]\n"
        "files: [data.txt]\n" + extra
    )
    return d


# ============================================================================ job file


def test_job_file_keys_are_checked_with_their_line(tmp_path: Path) -> None:
    """modules/files/requires: a missing file, a bad module name or a non-list names the line."""
    d = make_job_dir(tmp_path, "requires: [json, os.path]\n")
    spec = load_job(d / "job.yaml")
    assert spec.modules == ("helpers.py", "shippedpkg")
    assert spec.files == (d / "data.txt",)
    assert spec.options.requires == ("json", "os.path")
    cases = {
        "modules: [nothere.py]\n": r"bad.yaml:2: key 'modules': 'nothere.py' is not a \.py file",
        "modules: [no_such_module_qq]\n": "neither a file here nor an importable module",
        "files: [missing.csv]\n": r"bad.yaml:2: key 'files': 'missing.csv': no such file",
        "files: 3\n": "key 'files': expected a list of names",
        "requires: [not-a-name]\n": "'not-a-name' is not a module name",
        "modules: [json.decoder]\n": "ship the top-level package 'json' of 'json.decoder', not a submodule",
        "modules: [sys]\n": "'sys' is neither a file here nor an importable module",
        "files: [data.txt, other/data.txt]\n": "two files are named 'data.txt'; names must differ",
    }
    (d / "other").mkdir()
    (d / "other" / "data.txt").write_text("x")
    for line, problem in cases.items():
        (d / "bad.yaml").write_text("function: job.py:use\n" + line + "args: [1]\n")
        with pytest.raises(ConfigError, match=problem):
            load_job(d / "bad.yaml")


def test_a_submodule_is_refused_without_importing_its_package(tmp_path: Path, monkeypatch) -> None:
    """``modules: [pkg.sub]`` is refused by its name: finding the submodule's spec would run the
    package's ``__init__`` (a user's code, perhaps slow or with side effects) first."""
    pkg = tmp_path / "site" / "noisypkg_qq"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').touch()\n"
    )
    (pkg / "sub.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ConfigError, match="ship the top-level package 'noisypkg_qq' of"):
        bundle.module_root("noisypkg_qq.sub", tmp_path)
    assert not (pkg / "RAN").exists()
    assert "noisypkg_qq" not in sys.modules


def test_collect_reads_modules_packages_and_files(tmp_path: Path) -> None:
    """A file module, a package (every .py, no __pycache__) and files; bounded; names unique."""
    d = make_job_dir(tmp_path)
    (d / "shippedpkg" / "__pycache__").mkdir()
    (d / "shippedpkg" / "__pycache__" / "x.py").write_text("junk")
    got = bundle.collect(["helpers.py", "shippedpkg"], ["data.txt"], d)
    assert sorted(got.modules) == ["helpers.py", "shippedpkg/__init__.py", "shippedpkg/sub.py"]
    assert got.files == {"data.txt": b"abc"}
    assert bundle.collect(["json"], [], d).modules["json/__init__.py"]
    (d / "other").mkdir()
    (d / "other" / "data.txt").write_text("x")
    with pytest.raises(ConfigError, match="two files are named 'data.txt'"):
        bundle.collect([], ["data.txt", "other/data.txt"], d)
    assert bundle.wrap(b"fn", bundle.Bundle()) == b"fn"


def test_collect_takes_module_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``remap.connect(modules=[module])``: a module ships its file, a package its directory;
    a module without a file (built into Python) is one ConfigError."""
    d = make_job_dir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(d), *sys.path])
    for name in ("helpers", "shippedpkg", "shippedpkg.sub"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import helpers as module
    import shippedpkg as package

    got = bundle.collect([module, package], [], tmp_path)
    assert got.modules == {
        "helpers.py": HELPERS.encode(),
        "shippedpkg/__init__.py": b"",
        "shippedpkg/sub.py": b"K = 100\n",
    }
    bundle.make_importable([module], tmp_path)  # importable already: the path is left alone
    assert sys.path[0] == str(d) and str(tmp_path) not in sys.path
    with pytest.raises(ConfigError, match="module sys has no file to ship"):
        bundle.collect([sys], [], tmp_path)


def test_unwrap_installs_once_and_the_function_finds_its_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a core: the bundle lands in the job's directory, its modules import, job_file reads
    the data, and a hostile name cannot leave the directory."""
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(bundle.ENV, raising=False)
    modules = {"shipped_mod_x.py": b"VALUE = 41\n"}
    payload = bundle.wrap(pickle.dumps(("inner",)), bundle.Bundle(modules, {"d.txt": b"hi"}))
    try:
        assert pickle.loads(bundle.unwrap(payload, 5)) == ("inner",)
        assert bundle.unwrap(b"plain", 5) == b"plain"
        import shipped_mod_x

        assert shipped_mod_x.VALUE == 41
        assert bundle.job_file("d.txt").read_bytes() == b"hi"
        assert bundle.job_dir() == bundle.job_path(os.getppid(), 5)
        bad = bundle.wrap(b"x", bundle.Bundle({}, {"../escape": b"no"}))
        with pytest.raises(ValueError, match="leaves the job directory"):
            bundle.unwrap(bad, 6)
    finally:
        sys.modules.pop("shipped_mod_x", None)
        os.environ.pop(bundle.ENV, None)


@pytest.mark.parametrize("plant", ["world-writable", "link", "another user's"])
def test_a_node_directory_someone_else_made_first_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    """The node's directory has a name anyone can guess (``remap-node-PID`` in the temporary
    directory). Made first by someone else, holding a job's directory with a module of theirs,
    it is refused with one line: the core neither imports their module nor names their files
    as the job's (it did both: the job's directory was there, so nothing was written)."""
    if plant == "another user's" and os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(bundle.ENV, raising=False)
    theirs = tmp_path / "theirs" if plant == "link" else bundle.node_dir(os.getppid())
    planted = theirs / "job-7" / bundle.MODULES_DIR
    planted.mkdir(parents=True)
    (planted / "planted_mod_q.py").write_text("VALUE = 'theirs'\n")
    (theirs / "job-7" / "d.txt").write_text("theirs")
    if plant == "link":
        bundle.node_dir(os.getppid()).symlink_to(theirs)
    else:
        theirs.chmod(0o777)
        if plant == "another user's":
            theirs.chmod(0o700)
            os.chown(theirs, 65534, 65534)
    ours = bundle.Bundle({"planted_mod_q.py": b"VALUE = 'ours'\n"}, {"d.txt": b"ours"})
    try:
        with pytest.raises(ValueError, match="is not its own") as refused:
            bundle.unwrap(bundle.wrap(pickle.dumps(1), ours), 7)
        assert "\n" not in str(refused.value)
        bundle.enter_job(7)
        assert bundle.job_dir() == Path(".") and "planted_mod_q" not in sys.modules
    finally:
        sys.modules.pop("planted_mod_q", None)
        os.environ.pop(bundle.ENV, None)


# ============================================================================ requires


def _handler() -> tuple[RemapServerFactory, ServerConnection, FakeLink]:
    from twisted.internet.task import Clock

    factory = RemapServerFactory(Clock(), b"k" * 32, max_frame=1 << 20)
    handler = ServerConnection(factory)
    handler.role = "console"
    return factory, handler, FakeLink("console")


def _node(factory: RemapServerFactory, name: str, modules: list[str] | None) -> FakeLink:
    link = FakeLink(name)
    info = m.NodeInfo(host=name, pid=1, cores=1, memory=0, modules=modules)
    factory.scheduler.add_node(name, link, info)
    return link


def test_nodes_without_a_required_module_are_left_out_and_said() -> None:
    """A node lacking a required module is named in a notice and gets no task; a node that
    did not report its modules is trusted; the job runs on the others."""
    factory, handler, console = _handler()
    has = _node(factory, "has", ["numpy", "json"])
    lacks = _node(factory, "lacks", ["json"])
    unknown = _node(factory, "old", None)
    handler.message_received(
        console, m.Submit(id=1, name="j", requires=["numpy.linalg"], chunksize=1, payload=b"f")
    )
    job = console.of(m.Submitted)[0].job
    notices = [n.message for n in console.of(m.JobNotice, job)]
    assert notices == ["node lacks left out: cannot import numpy"]
    handler.message_received(console, m.Args(job=job, start=0, sizes=[1] * 6, payload=b"abcdef"))
    assert lacks.of(m.Task) == [] and has.of(m.Task) and unknown.of(m.Task)


def test_a_job_no_node_can_run_fails_at_once_with_the_reason() -> None:
    """Every connected node lacks the module: the job fails at submit, naming each node."""
    factory, handler, console = _handler()
    _node(factory, "a", ["json"])
    _node(factory, "b", ["json"])
    handler.message_received(console, m.Submit(id=1, name="j", requires=["torch"], payload=b"f"))
    (done,) = console.of(m.JobDone)
    assert done.state == "failed"
    assert done.message == "no node can run this job (requires): a lacks torch; b lacks torch"


# ============================================================================ real processes


@pytest.mark.slow
def test_modules_and_files_reach_nodes_that_have_no_copy(make_cluster, tmp_path: Path) -> None:
    """A job with modules: and files: runs on nodes whose path has neither (they run in another
    directory); with requires:, a node without the module is left out with a line saying so."""
    from tests.cluster_harness import ROOT, NodeSpec

    extra = tmp_path / "only_on_one"
    extra.mkdir()
    (extra / "only_here_mod.py").write_text("")
    c = make_cluster(
        [
            NodeSpec(cores=1, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{extra}"}),
            NodeSpec(cores=1),
        ]
    )
    c.wait_for_nodes(2)
    d = make_job_dir(tmp_path, "requires: [only_here_mod]\n")
    done = c.assert_ok(c.console("compute", str(d / "job.yaml"), "--json", "--quiet"))
    assert json.loads(done.stdout) == [2 * x + 100 + 3 for x in range(40)], c.explain(done)
    assert "left out: cannot import only_here_mod" in done.stderr, c.explain(done)
    (d / "plain.py").write_text("def f(x):\n    return x\n")
    (d / "none.yaml").write_text("function: plain.py:f\nargs: [1]\nrequires: [no_such_mod_zz]\n")
    failed = c.console("compute", str(d / "none.yaml"), "--quiet")
    assert failed.returncode == 1, c.explain(failed)
    assert "no node can run this job (requires)" in failed.stderr
    assert "lacks no_such_mod_zz" in failed.stderr


def _uses_shipped(x: int) -> int:
    import shipped_api_mod_q  # only in the handle's bundle: not on any path here or on cores

    import remap

    return shipped_api_mod_q.K * x + len(remap.job_file("api-data.txt").read_text())


@pytest.mark.slow
def test_python_api_connect_ships_modules_and_files(tmp_path: Path, monkeypatch) -> None:
    """connect(modules=..., files=...) ships both with every job of the handle."""
    import remap

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "shipped_api_mod_q.py").write_text("K = 10\n")
    (tmp_path / "src" / "api-data.txt").write_text("12345")
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the current directory
    with remap.connect(
        cores=1, env_file=None, modules=["src/shipped_api_mod_q.py"], files=["src/api-data.txt"]
    ) as cluster:
        assert cluster.map(_uses_shipped, range(5)) == [10 * x + 5 for x in range(5)]
    assert "shipped_api_mod_q" not in sys.modules
