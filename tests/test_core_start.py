"""What a core process does before it says ready: a node starts hundreds, each a fresh Python
paying for every import and every class its entry builds (bench/core_start.py measures it).

Each test runs a fresh interpreter, as a node's core is one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (the project on its path, as a node spawns a core);
    it prints one JSON value, returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_core_entry_generates_no_message_codec_until_a_message_is_used() -> None:
    """Importing the core's entry declares the catalogue but generates no message's encoder,
    decoder or ``make`` (most of the catalogue's cost, and a core uses five of its messages);
    a message used is generated then, and it alone, and decodes as before."""
    seen = fresh(
        "import json\n"
        "import remap.node.core\n"
        "from protocol import messages as m\n"
        "at_import = sorted(c.TYPE for c in m._ENCODERS)\n"
        "ready = m.CoreReady.make(pid=7)\n"
        "back = m.decode(*m.encode(ready), channel='pipe')\n"
        "print(json.dumps({'at_import': at_import, 'after': sorted(c.TYPE for c in m._ENCODERS),"
        " 'pipe': sorted(m._CHANNELS['pipe']), 'same': back == m.CoreReady(pid=7)}))\n"
    )
    assert seen == {"at_import": [], "after": ["core_ready"], "pipe": ["core_ready"], "same": True}


def test_the_core_entry_leaves_out_what_a_core_needs_for_no_task() -> None:
    """A core reads catalogue messages on its pipe; the handshake's modules (``protocol``'s
    connection, ``hashlib``, ``hmac``; the catalogue's fingerprint: ``json``) and a job
    bundle's (``shutil``, ``tempfile``) are not imported by the core's entry; no message class
    has an ``__eq__``, ``__hash__`` or ``__repr__`` of its own (generated per class, they cost
    a start three compiles each), and the messages compare, hash and print as the frozen
    dataclasses they are."""
    seen = fresh(
        "import sys\n"
        "import remap.node.core\n"
        "left_out = ['protocol.connection', 'hashlib', 'hmac', 'json', 'shutil', 'tempfile']\n"
        "loaded = [name for name in left_out if name in sys.modules]\n"
        "import json\n"
        "from protocol import messages as m\n"
        "task = m.Task(task=1, job=2, sizes=[3], payload=b'x')\n"
        "same = m.Task(task=1, job=2, sizes=[3], payload=b'x')\n"
        "own = [n for c in m.message_types().values() for n in ('__eq__', '__hash__',"
        " '__repr__') if n in vars(c)]\n"
        "print(json.dumps({'loaded': loaded, 'own': own, 'repr': repr(task), 'eq': [task == same,"
        " task == m.Task(task=1, job=3, sizes=[3]), task == 1, hash(m.CoreDrop(job=4)) =="
        " hash(m.CoreDrop(job=4))]}))\n"
    )
    assert seen == {
        "loaded": [],
        "own": [],
        "repr": "Task(task=1, job=2, sizes=[3], groups=[], skip=0, count=-1, payload=b'x')",
        "eq": [True, False, False, True],
    }
