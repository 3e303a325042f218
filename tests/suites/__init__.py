"""Where the standard libraries' own test suites are found (fetched by ``tests/suites/fetch.sh``
into ``.suites/``, never committed) and how a difference from them is declared."""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
FETCHED = ROOT / ".suites"
FETCH_HINT = "run tests/suites/fetch.sh first (needs apt and pip)"


def load_module(name: str, path: Path) -> types.ModuleType:
    """Import ``path`` as module ``name`` (the suites import themselves by that name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def readme_differences(heading: str) -> str:
    """The README's table of differences under ``heading`` (a ``###`` section)."""
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"### {heading}", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


#: whether this run's ``-m`` names the suites (set by conftest's ``pytest_configure``); None
#: outside a pytest session: a core importing a suite's module to unpickle one of its case's
#: functions must get the module, not a skip (it would kill the core)
SELECTED: list[bool | None] = [None]


def skip_unless_selected() -> None:
    """Skip a suite's module before it loads anything: importing the suites' files has global
    effects (joblib's imports ``distributed``, which makes every exception class defined so
    far pickle with tblib's picklers), which the main run must not see."""
    if SELECTED[0] is False:
        pytest.skip("a standard library's own suite: run with -m suites", allow_module_level=True)


def skip_unless_fetched(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is missing: {FETCH_HINT}", allow_module_level=True)


def mark_cases(
    namespace: dict[str, object],
    differences: dict[str, str],
    not_applicable: dict[str, str] | None = None,
) -> None:
    """``Class.method`` of ``differences`` become expected failures (a pass fails the suite, so
    the list stays true); those of ``not_applicable`` are skipped with their reason."""
    for name, why in [*differences.items(), *(not_applicable or {}).items()]:
        cls_name, _, method = name.partition(".")
        cls = namespace[cls_name]
        wrap = unittest.expectedFailure if name in differences else unittest.skip(why)
        setattr(cls, method, wrap(getattr(cls, method)))


def assert_readme_lists(heading: str, *cases: dict[str, str]) -> None:
    """The README's table under ``heading`` names every listed case (it is the contract)."""
    table = readme_differences(heading)
    for listed in cases:
        for name in listed:
            case = name.split(".", 1)[1] if name[:1].isupper() else name  # Class.method: method
            assert f"`{case}`" in table, f"README's {heading!r} lacks {name}"


_cluster: list[Any] = []
if hasattr(os, "register_at_fork"):  # a forked child (joblib's multiprocessing) starts its own
    os.register_at_fork(after_in_child=_cluster.clear)


def shared_cluster() -> Any:
    """One embedded 4-core cluster for every suite in this process (cores are processes)."""
    if not _cluster:
        import remap
        from remap.settings import Settings

        _cluster.append(remap.connect(cores=4, settings=Settings()))
        atexit.register(_cluster[0].close)
    return _cluster[0]
