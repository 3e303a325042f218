"""Functions for the failure tests (tests/test_failures.py): crash, exit, hang on purpose.

Each misbehaves on one chosen argument only, so a test can check that the culprit gets the
error and its batch neighbours still succeed. Shipped by value, so nodes need no copy.
"""

from __future__ import annotations

import os
import signal
import time

#: the argument the crashing and hanging functions pick on
CULPRIT = 7


def segfault_on_culprit(x):
    """Kills its own core with SIGSEGV (as a C extension bug would) on CULPRIT; else x * x."""
    if x == CULPRIT:
        os.kill(os.getpid(), signal.SIGSEGV)
    return x * x


def exit_on_culprit(x):
    """Ends its core with ``os._exit(3)`` (no cleanup, no exception) on CULPRIT; else x * x."""
    if x == CULPRIT:
        os._exit(3)
    return x * x


def hang_on_culprit(x):
    """Sleeps 30 s on CULPRIT (far past any test's timeout: only a killed core ends it); else x + 100."""
    if x == CULPRIT:
        time.sleep(30)
    return x + 100


def stuck(x):
    """Sleeps 30 s on every argument: a job of these only ends if remap kills its cores."""
    time.sleep(30)
    return x


def nap(x):
    """0.1 s then x * x: a job of a few dozen lasts a couple of seconds."""
    time.sleep(0.1)
    return x * x


def where(x):
    """0.1 s then ``[x, TEST_NODE_NAME]``: which node ran each argument."""
    time.sleep(0.1)
    return [x, os.environ.get("TEST_NODE_NAME")]


def square(x):
    """x * x, instantly: the "next job" that proves the cluster still works."""
    return x * x


#: gated functions run their first GATE_AFTER arguments at once, then wait for the file named
#: by TEST_GATE to exist: a test holds a job mid-run for as long as it needs, whatever the load
GATE_AFTER = 4


def _wait_for_gate(x):
    gate = os.environ.get("TEST_GATE")
    if gate and x >= GATE_AFTER:
        deadline = time.monotonic() + 120
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test never opened the gate {gate}")
            time.sleep(0.02)


def gated_nap(x):
    """x * x, after the gate for arguments from GATE_AFTER on."""
    _wait_for_gate(x)
    return x * x


def gated_block(x):
    """``[x, 64 KiB]``, after the gate for arguments from GATE_AFTER on: results that fill a
    disk."""
    _wait_for_gate(x)
    return [x, "b" * 65536]


def gated_where(x):
    """``[x, TEST_NODE_NAME]``, after the gate for arguments from GATE_AFTER on."""
    _wait_for_gate(x)
    time.sleep(0.01)
    return [x, os.environ.get("TEST_NODE_NAME")]


def paced_gated(x):
    """x * x after a nap of TEST_PACE_SMALL seconds for x < 200000, TEST_PACE_LARGE above (so
    jobs of different sizes last as long); the arguments listed in TEST_GATED (comma-separated)
    first wait for the TEST_GATE file, so no job finishes before the test opens the gate. Every
    call first waits for TEST_START_GATE (if set): jobs submitted one after another start at once."""
    start = os.environ.get("TEST_START_GATE")
    while start and not os.path.exists(start):
        time.sleep(0.02)
    key = "TEST_PACE_SMALL" if x < 200_000 else "TEST_PACE_LARGE"
    time.sleep(float(os.environ.get(key, "0")))
    if str(x) in os.environ.get("TEST_GATED", "").split(","):
        _wait_for_gate(GATE_AFTER)
    return x * x
