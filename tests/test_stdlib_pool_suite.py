"""CPython's own multiprocessing.Pool test cases, run against remap.Pool.

The cases come from the running interpreter's ``test._test_multiprocessing`` (shipped with
CPython; Debian packages it as ``libpython3.X-testsuite``); only the pool is swapped for
remap's, on one shared embedded cluster. Cases that test what remap deliberately does
differently are listed in ``DIFFERENCES`` with the reason, and the README's table of
differences is checked against that list, so the table stays the contract.
"""

from __future__ import annotations

import unittest
from unittest import mock

import pytest

from tests.suites import skip_unless_selected

skip_unless_selected()
mp_tests = pytest.importorskip(
    "test._test_multiprocessing", reason="this Python has no test suite (libpython3.X-testsuite)"
)

import remap  # noqa: E402
from tests.suites import assert_readme_lists, mark_cases, shared_cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.suites, pytest.mark.timeout(300)]


def _pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None, context=None):
    return remap.Pool(processes, initializer, initargs, maxtasksperchild, cluster=shared_cluster())


class RemapMixin(mp_tests.ProcessesMixin):
    Pool = staticmethod(_pool)


#: case name -> why remap differs (the README's table of differences lists the same)
DIFFERENCES: dict[str, str] = {
    "TestRemapPool.test_imap_handle_iterable_exception": (
        "an exception from the iterable is raised exactly at its position; multiprocessing "
        "raises it at the start of the chunk that holds it (chunksize > 1)"
    ),
    "TestRemapPool.test_make_pool": (
        "reads the private worker list `Pool._pool`; remap's cores belong to the cluster"
    ),
    "TestRemapPool.test_map_unplicklable": (
        "an argument that cannot be pickled raises remap.PicklingError (a pickle.PicklingError "
        "naming the argument) with the original error as its __cause__, not the original error"
    ),
    "TestRemapPoolWorkerErrors.test_unpickleable_result": (
        "its unpicklable result is a lambda, which remap's cores send back with cloudpickle; "
        "a result nothing can pickle raises MaybeEncodingError (tests/test_pool.py)"
    ),
    "TestRemapPool.test_traceback": (
        "the remote traceback (with a `.tb` text, as multiprocessing's) is a "
        "remap.RemoteTraceback, not a multiprocessing.pool.RemoteTraceback"
    ),
}


class TestRemapPool(mp_tests._TestPool, RemapMixin, unittest.TestCase):
    """multiprocessing's _TestPool on remap.Pool."""


class TestRemapPoolWorkerErrors(mp_tests._TestPoolWorkerErrors, RemapMixin, unittest.TestCase):
    """multiprocessing's _TestPoolWorkerErrors: its cases call ``multiprocessing.Pool(2)``,
    which is remap.Pool on the shared cluster while each runs."""

    def setUp(self) -> None:
        patcher = mock.patch.object(mp_tests.multiprocessing, "Pool", _pool)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()


mark_cases(globals(), DIFFERENCES)


def test_the_readme_lists_every_difference() -> None:
    """The README's table of differences is the contract: it names every case expected to fail
    here (and each of those still fails: ``expectedFailure`` turns a pass into a failure)."""
    assert_readme_lists("Differences from the standard library", DIFFERENCES)
