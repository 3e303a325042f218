"""The package is split by side: a client that dials a remote cluster loads no server or node code."""

from __future__ import annotations

import json
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
