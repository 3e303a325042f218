"""Functions the end-to-end tests run on the cluster; shipped by value, so nodes need no copy.

Each is a plain function of its argument. ``expected_*`` helpers are not needed: tests compute
their expectation by calling the same function locally.
"""

from __future__ import annotations

import os
import time


def square(x):
    """x * x: the workhorse; cheap, so batches are large."""
    return x * x


def add(a, b):
    """Fold for reduce mode (associative and commutative)."""
    return a + b


def identity(x):
    """Returns its argument: checks that values survive the round trip unchanged."""
    return x


def combine(a=0, b=0, c=0):
    """For ``star: true``: positional lists and keyword mappings both land here."""
    return [a, b, c]


def fail_on_3_mod_7(x):
    """Raises ValueError for arguments with x % 7 == 3, else returns 2 * x."""
    if x % 7 == 3:
        raise ValueError(f"{x} is 3 mod 7")
    return 2 * x


def node_name(x):
    """Which node ran this call: nodes are started with a distinct TEST_NODE_NAME."""
    return os.environ.get("TEST_NODE_NAME")


def slow(x):
    """Takes a while (0.3 s per call), so a test can see the job running and kill it."""
    time.sleep(0.3)
    return x


def stuck(x):
    """Sleeps 60 s: only killing its core frees the core in time for the next job."""
    time.sleep(60)
    return x


def hold_memory(mib):
    """Keeps ``mib`` MiB written in its core (a core that then takes a while to exit once
    killed); returns the core's CPU time so far."""
    global _HELD
    _HELD = bytearray(b"x") * (mib << 20)
    return time.process_time()


def nap(x):
    """A short sleep (50 ms) then x * x: long enough to kill a node in the middle of a job."""
    time.sleep(0.05)
    return x * x


def chatty(x):
    """Prints a line per call: the console must show it on its stderr."""
    print(f"chatty says hello from argument {x}")
    return x + 1


def talkative(x):
    """Says one line each through print, stderr and logging (a handler made on first use)."""
    import logging
    import sys

    log = logging.getLogger("remap.tests.talkative")
    if not log.handlers:  # bound to sys.stderr as it is now: the first batch's
        log.addHandler(logging.StreamHandler())
        log.propagate = False
    print(f"print {x}")
    print(f"stderr {x}", file=sys.stderr)
    log.warning("logging %s", x)
    return x


class Unreadable:
    """Pickles fine on the core but raises when unpickled (on the console)."""

    def __reduce__(self):
        return (int, ("not a number",))


def unreadable_on_3_mod_7(x):
    """Returns x, except an object the console cannot unpickle for x % 7 == 3."""
    return Unreadable() if x % 7 == 3 else x


def ten_kilobytes(x):
    """A 10 kB string: a few hundred of these fill a small disk."""
    return f"{x}:" + "x" * 10_000


def kibibytes(n):
    """A string of ``n`` KiB: results over a small frame limit."""
    return "k" * (n * 1024)
