"""The package is split by side: a client that dials a remote cluster loads no server or node code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import json, sys
import remap
try:
    remap.connect("127.0.0.1:1", secret="s" * 32, connect_timeout=2)
except remap.RemapError as exc:
    outcome = type(exc).__name__
else:
    outcome = "connected?"
print(json.dumps({"outcome": outcome,
                  "modules": sorted(m for m in sys.modules if m.startswith("remap"))}))
"""


@pytest.mark.slow
def test_dialling_a_remote_cluster_loads_no_server_or_node_module(tmp_path: Path) -> None:
    """A fresh interpreter that imports remap and connects to an address (here one that refuses)
    has loaded neither ``remap.server`` nor ``remap.node`` (nor the composition root)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "ServerUnreachable"
    loaded = report["modules"]
    assert "remap.api" in loaded, "the probe did go through the Python API"
    heavy = [m for m in loaded if m.startswith(("remap.server", "remap.node", "remap.cluster"))]
    assert heavy == [], f"a remote client loaded {heavy}"


def test_cores_unpickle_from_a_small_module() -> None:
    """What a core needs to load a job lives in ``remap.shipping``, which imports nothing of remap."""
    source = (ROOT / "remap" / "shipping.py").read_text()
    assert "from remap" not in source and "from ." not in source


def _library_modules() -> set[str]:
    """Every module of the library: the packages ``remap`` and ``protocol`` and the entry points."""
    found = {p for p in ROOT.glob("remap/**/*.py") if "__pycache__" not in p.parts}
    found |= set(ROOT.glob("protocol/*.py")) | set(ROOT.glob("remap_*.py"))
    return {p.relative_to(ROOT).as_posix() for p in found}


def _map_of_rooms() -> dict[str, str]:
    """The module → name table at the top of ARCHITECTURE.md (its first fenced block)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    rooms = {}
    for line in block.splitlines():
        module, _, name = line.strip().partition(" ")
        assert module not in rooms, f"{module} is named twice in the map"
        rooms[module] = name.strip()
    return rooms


def test_the_map_of_rooms_names_every_module_in_three_words() -> None:
    rooms = _map_of_rooms()
    modules = _library_modules()
    assert sorted(modules - rooms.keys()) == [], "modules missing from ARCHITECTURE.md's map"
    assert sorted(rooms.keys() - modules) == [], "the map names modules that do not exist"
    wordy = {m: n for m, n in rooms.items() if not 1 <= len(n.split()) <= 3}
    assert wordy == {}, "a room's name is one to three words"


def test_the_library_stays_within_its_size_budget() -> None:
    """The library may not grow past the budget ARCHITECTURE.md states: growth is a decision, made
    in the commit that raises the budget and says why, never a drift."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    budget = int(re.search(r"size budget: ([\d,]+) lines", text).group(1).replace(",", ""))
    lines = sum(len((ROOT / m).read_text().splitlines()) for m in _library_modules())
    assert lines <= budget, (
        f"the library is {lines:,} lines, over its budget of {budget:,}: "
        "shrink it, or raise the budget in ARCHITECTURE.md and say why in the commit"
    )
