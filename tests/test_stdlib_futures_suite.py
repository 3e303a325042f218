"""concurrent.futures' own test cases, run against remap.Executor.

``ExecutorTest``, ``WaitTests``, ``AsCompletedTests``, ``ExecutorShutdownTest`` and the
initializer cases come from CPython's ``Lib/test/test_concurrent_futures.py`` (Debian's
``libpython3.X-testsuite`` for the running Python's 3.X, fetched into ``.suites/`` by
``tests/suites/fetch.sh``; never vendored). Only the executor is swapped: every case gets a
``remap.Executor`` borrowing one shared embedded cluster. Cases that test what remap
deliberately does differently are listed in ``DIFFERENCES`` (expected to fail) or
``NOT_APPLICABLE`` (skipped), each with its reason, and the README's table must list them all.
"""

from __future__ import annotations

import sys

import cloudpickle
import pytest

from tests.suites import (
    FETCHED,
    assert_readme_lists,
    load_module,
    mark_cases,
    shared_cluster,
    skip_unless_fetched,
    skip_unless_selected,
)

pytestmark = [pytest.mark.slow, pytest.mark.suites, pytest.mark.timeout(300)]
skip_unless_selected()

SOURCE = FETCHED / "cpython" / "test_concurrent_futures.py"
if sys.version_info[:2] != (3, 11):
    pytest.skip(
        "the harness adapts Python 3.11's single-file test_concurrent_futures",
        allow_module_level=True,
    )
skip_unless_fetched(SOURCE)

import remap  # noqa: E402

cf = load_module("test.test_concurrent_futures", SOURCE)
# the cores have no copy of the suite's module: its helpers (mul, init, MyObject...) travel by value
cloudpickle.register_pickle_by_value(cf)


def remote_executor(max_workers: int | None = None, **kwargs: object) -> remap.Executor:
    """``remap.Executor`` as the suite constructs its executors, on the shared cluster."""
    if max_workers is not None and max_workers <= 0:
        return remap.Executor(max_workers=max_workers)  # raises ValueError as the stdlib does
    return remap.Executor(cluster=shared_cluster(), **kwargs)  # type: ignore[arg-type]


class RemapMixin(cf.ExecutorMixin):
    executor_type = staticmethod(remote_executor)


class TestRemapExecutor(RemapMixin, cf.ExecutorTest, cf.BaseTestCase):
    """concurrent.futures' ExecutorTest."""


class TestRemapWait(RemapMixin, cf.WaitTests, cf.BaseTestCase):
    """concurrent.futures' WaitTests."""


class TestRemapAsCompleted(RemapMixin, cf.AsCompletedTests, cf.BaseTestCase):
    """concurrent.futures' AsCompletedTests."""


class TestRemapShutdown(RemapMixin, cf.ExecutorShutdownTest, cf.BaseTestCase):
    """concurrent.futures' ExecutorShutdownTest."""


class TestRemapInitializer(cf.InitializerMixin, RemapMixin, cf.BaseTestCase):
    """concurrent.futures' initializer case."""


class TestRemapFailingInitializer(cf.FailingInitializerMixin, RemapMixin, cf.BaseTestCase):
    """concurrent.futures' failing-initializer case."""


_CHILD = (
    "runs a child interpreter that imports the executor class by name from concurrent.futures "
    "and reads the task's print from its stdout (remap shows task output on stderr, prefixed "
    "with node and core); tests/test_executor.py::test_interpreter_exit_waits_for_outstanding_"
    "calls checks the same exit behaviour for remap.Executor"
)

#: case -> why remap differs (expected to fail; the README's table lists the same)
DIFFERENCES: dict[str, str] = {}

#: case -> why it cannot apply to remap (skipped; the README's table lists these too)
NOT_APPLICABLE: dict[str, str] = {
    "TestRemapShutdown.test_interpreter_shutdown": _CHILD,
    "TestRemapShutdown.test_submit_after_interpreter_shutdown": _CHILD,
    "TestRemapShutdown.test_hang_gh83386": _CHILD,
    "TestRemapShutdown.test_cancel_futures": (
        "needs some of 50 calls submitted just before shutdown(cancel_futures=True) to have "
        "started; remap hands calls to the server only once the function's job is open, so "
        "usually every one is still pending and cancelled (the outcome is timing, not a bug)"
    ),
}

mark_cases(globals(), DIFFERENCES, NOT_APPLICABLE)


def test_the_readme_lists_every_difference() -> None:
    """The README's table is the contract: it names every case expected to fail or skipped."""
    assert_readme_lists("Differences from concurrent.futures", DIFFERENCES, NOT_APPLICABLE)
