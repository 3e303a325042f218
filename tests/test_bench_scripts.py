"""Every bench script's imports of the project resolve, so a renamed name breaks the suite.

Bench scripts import remap's lower layers, often inside functions (so ``--help`` and a plain
import pass while the bench itself fails). Each ``import``/``from ... import`` of the project
found anywhere in a script's syntax tree is resolved here, without running the script; imports
of optional peers (dask, ray, sklearn) are left out.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))
#: top-level names that are the project's: its packages and its root modules
LOCAL = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}
LOCAL.add("bench")


def unresolved_imports(source: str, filename: str) -> list[str]:
    """Each project import in ``source`` (at any depth) that does not resolve, as one line."""
    missing = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LOCAL:
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as exc:
                        missing.append(f"line {node.lineno}: import {alias.name}: {exc}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in LOCAL:
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                missing.append(f"line {node.lineno}: from {node.module}: {exc}")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:  # a submodule not yet imported
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(
                        f"line {node.lineno}: cannot import name {alias.name!r} from {node.module}"
                    )
    return missing


def test_the_bench_scripts_are_found() -> None:
    """The glob sees the bench (a moved directory would make the next test pass vacuously)."""
    assert len(SCRIPTS) >= 10
    assert ROOT / "bench" / "journal_bench.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports_resolve(script: Path) -> None:
    """Every name a bench script imports from remap, protocol or bench exists (and the script
    parses), including imports inside functions that only run when the bench does."""
    assert unresolved_imports(script.read_text(), str(script)) == []


def test_a_renamed_name_is_caught() -> None:
    """The checker itself: a lazy import of a name that is gone is reported, a good one not."""
    source = (
        "def run():\n"
        "    from remap.client import JobStream\n"
        "    from remap.client import JobRun\n"
        "    import dask_not_ours\n"
    )
    assert unresolved_imports(source, "x.py") == [
        "line 3: cannot import name 'JobRun' from remap.client"
    ]
