"""The allocator tuning of remap's own processes (remap/malloc.py): a MiB buffer freed and
allocated again reuses mapped pages instead of faulting in fresh ones (issue 16, 1 MiB calls)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from remap import malloc

FAULTS = r"""
import os, resource, sys
from remap.malloc import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
src = os.urandom(1 << 20)
def round_():
    a = bytearray(1 << 20); a[:] = src; b = bytes(a); del a, b  # a frame read, then its copy
for _ in range(20):
    round_()
before = __import__("resource").getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    round_()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(tuned, (after - before) / 100)
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_tuned_process_reuses_the_pages_of_a_freed_mib() -> None:
    tuned, faults = _faults("tuned")
    assert tuned == "True"
    assert faults < 16, f"{faults} page faults per MiB round with the tuning"
    _, plain = _faults("plain")
    assert plain > 200, f"{plain} page faults per MiB round without it (the test's premise)"


def test_the_users_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert malloc.keep_freed_memory() is False
