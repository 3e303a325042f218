"""The pytest configuration itself: what the suite collects (CI runs the README's command)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: pytest's own norecursedirs: setting the option replaces them, so the config must repeat them
PYTEST_DEFAULTS = "*.egg .* _darcs build CVS dist node_modules venv {arch}".split()


def test_norecursedirs_keeps_pytests_defaults_and_skips_the_fetched_suites(
    pytestconfig: pytest.Config,
) -> None:
    """``.suites/`` (CPython's and joblib's suites that tests/suites/fetch.sh downloads into
    the tree) is never recursed into, and pytest's defaults (.venv, build, ...) still apply."""
    ignored = pytestconfig.getini("norecursedirs")
    assert ".suites" in ignored
    assert [d for d in PYTEST_DEFAULTS if d not in ignored] == []


@pytest.mark.slow
def test_a_tree_with_fetched_suites_collects_only_its_own_tests(tmp_path: Path) -> None:
    """With this project's config, collecting a tree that holds a downloaded ``.suites/``
    (here a failing test in it) collects the tree's own test and nothing under ``.suites``."""
    (tmp_path / ".suites" / "cpython").mkdir(parents=True)
    (tmp_path / ".suites" / "cpython" / "test_theirs.py").write_text(
        "def test_theirs():\n    assert False\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_ours.py").write_text("def test_ours():\n    pass\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"]
        + ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "test_ours.py::test_ours" in run.stdout
    assert "test_theirs" not in run.stdout


@pytest.mark.slow
def test_sigterm_to_pytest_ends_the_run_saying_so(tmp_path: Path) -> None:
    """SIGTERM to a pytest run with this suite's conftest (an outer ``timeout``, a cancel)
    ends it at once with one line saying so. Twisted's handler stopped pytest-twisted's
    reactor instead: the run went on, a test soon after failed with "illegal switch in
    blockon" (here ``test_after``), every later one with "twisted reactor has stopped"."""
    (tmp_path / "test_term.py").write_text(
        "import os, signal\n\n"
        "def test_terminated():\n    os.kill(os.getpid(), signal.SIGTERM)\n\n"
        "def test_next():\n    pass\n\n"
        "def test_after():\n    pass\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:randomly"]
        + ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -signal.SIGTERM, run.stdout + run.stderr
    assert "pytest: SIGTERM received" in run.stderr
    assert "illegal switch" not in run.stdout + run.stderr
