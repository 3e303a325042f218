"""Shared fixtures: a clean environment for every test, and real clusters on loopback."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from tests.cluster_harness import Cluster, ClusterFactory, NodeSpec

# property tests check correctness, not speed: on a loaded 2-core machine a single example can
# take seconds, and hypothesis' default 200 ms deadline then fails a correct test
hypothesis_settings.register_profile("remap", deadline=None)
hypothesis_settings.load_profile("remap")


def _default_sigterm_in_forked_child() -> None:
    """SIGTERM in this process runs a Python handler (:func:`_sigterm_ends_the_run`, Twisted's
    before it), which a child a test forks (multiprocessing's fork workers, joblib's
    ``multiprocessing`` backend) inherits: under Twisted's it survived ``Pool.terminate()``'s
    SIGTERM, and the pool's join, and pytest's exit, waited forever. Forked children get the
    default disposition, as under a plain Python process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)


@pytest.fixture(autouse=True)
def _isolated_settings(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """No test reads the developer's REMAP_* variables or ~/.remap: HOME is a fresh directory.

    Discovery is off unless a test turns it on: no test multicasts on the machine's network.
    """
    for name in list(os.environ):
        if name.startswith("REMAP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REMAP_DISCOVERY", "off")
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Factory: ``make_cluster(nodes=2, cores=1, heartbeat=0.5, ...)`` -> a started Cluster.

    ``nodes`` is a count or a list of :class:`NodeSpec`. Every cluster made is stopped
    (children SIGTERMed, then SIGKILLed) when the test ends, whatever its outcome.
    """
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def cluster(make_cluster: ClusterFactory) -> Cluster:
    """A server and two one-core nodes on 127.0.0.1, for one test."""
    return make_cluster([NodeSpec(cores=1), NodeSpec(cores=1)])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA (trustme) and a server certificate for 127.0.0.1, as PEM files (``ca``,
    ``cert``, ``key``)."""
    import trustme

    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture
def make_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Factory: ``make_tmpfs(name, size)`` mounts a tmpfs of ``size`` (``1m``) at
    ``tmp_path/name``: writing more fails with ENOSPC, as on a full disk. Needs root: the test
    is skipped, saying why, where it cannot mount. Unmounted when the test ends."""
    mounted: list[Path] = []

    def make(name: str, size: str) -> Path:
        mount = tmp_path / name
        mount.mkdir()
        try:
            done = subprocess.run(
                # 0755, not tmpfs's 1777: a server refuses a state directory others may write
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except OSError as exc:
            pytest.skip(f"cannot run mount: {exc}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(mount)
        return mount

    try:
        yield make
    finally:
        for mount in mounted:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


@pytest.fixture
def small_disk(make_tmpfs: Callable[[str, str], Path]) -> Path:
    """A 1 MiB tmpfs (needs root): writing more fails with ENOSPC, as on a full disk."""
    return make_tmpfs("small", "1m")


def _sigterm_ends_the_run(config: pytest.Config, signum: int, frame: object) -> None:
    """SIGTERM to pytest (an outer ``timeout``, a cancel, a stray kill) ends the run saying so.
    Twisted's handler stopped the reactor instead: a test soon after failed with
    pytest-twisted's "illegal switch in blockon", every later one with "twisted reactor has
    stopped", and nothing said why."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the line goes to the terminal, not to a test's captured output
        capture.suspend_global_capture(in_=True)
    sys.stderr.write("\npytest: SIGTERM received (an outer timeout or a cancel?): the run stops\n")
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.hookimpl(trylast=True)  # after pytest-twisted installed the reactor
def pytest_configure(config: pytest.Config) -> None:
    from twisted.internet import reactor

    from tests import suites

    suites.SELECTED[0] = "suites" in (config.option.markexpr or "")
    # Twisted installs its handlers as the reactor starts (pytest-twisted's first test)
    reactor.callWhenRunning(
        signal.signal, signal.SIGTERM, functools.partial(_sigterm_ends_the_run, config)
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The standard libraries' own suites (``suites`` marker) run in their own step only, when
    ``-m`` names them: the main run must not depend on what ``tests/suites/fetch.sh`` fetched."""
    if "suites" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a standard library's own suite: run with -m suites")
    for item in items:
        if item.get_closest_marker("suites") is not None:
            item.add_marker(skip)
