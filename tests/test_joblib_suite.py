"""joblib's own ``joblib/test/test_parallel.py``, with the backend set to remap.

The file comes from the joblib sdist on PyPI at the installed joblib's version (fetched into
``.suites/`` by ``tests/suites/fetch.sh``; never vendored). remap's backend is registered
before the file is loaded, so every case parametrized over ``BACKENDS`` includes it; cases
parametrized over joblib's process backends (``"loky"``, ``"multiprocessing"``) get
``"remap"`` as one more value; and the default backend is remap (joblib's own switch for
running its suite on another backend, ``parallel.DEFAULT_BACKEND``). The cases that then run
on remap are the backend-generic ones counted here; cases only about joblib's own backends
(threading, loky's reuse, ...) are skipped as such. Failures are listed in ``DIFFERENCES``
with the reason, and the README's table lists them too.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.suites import (
    FETCHED,
    assert_readme_lists,
    load_module,
    shared_cluster,
    skip_unless_fetched,
    skip_unless_selected,
)

pytestmark = [pytest.mark.slow, pytest.mark.suites, pytest.mark.timeout(120)]
skip_unless_selected()

joblib = pytest.importorskip("joblib")
SOURCE = FETCHED / f"joblib-{joblib.__version__}" / "joblib" / "test" / "test_parallel.py"
skip_unless_fetched(SOURCE)

import joblib.testing  # noqa: E402
from joblib import parallel  # noqa: E402

import remap.joblib  # noqa: E402


class RemapBackend(remap.joblib.RemapBackend):
    """remap's backend on the suites' shared 4-core embedded cluster (made on first use);
    the same class name, as joblib's cases compare backend type names."""

    @property
    def cluster(self) -> Any:
        return shared_cluster()


joblib.register_parallel_backend("remap", RemapBackend)

#: the parameters of joblib's cases that name a backend
BACKEND_ARGS = {"backend", "parent_backend", "child_backend", "outer_backend", "inner_backend"}
_parametrize = joblib.testing.parametrize


def _with_remap(argnames: Any, argvalues: Any, *args: Any, **kwargs: Any) -> Any:
    """joblib.testing.parametrize, adding "remap" wherever a case lists loky."""
    if argnames in BACKEND_ARGS:
        values = list(argvalues)
        if "loky" in values and "remap" not in values:
            values.append("remap")
        argvalues = values
    return _parametrize(argnames, argvalues, *args, **kwargs)


joblib.testing.parametrize = _with_remap
try:
    suite = load_module("joblib.test.test_parallel", SOURCE)
finally:
    joblib.testing.parametrize = _parametrize

globals().update({k: v for k, v in vars(suite).items() if k.startswith("test_")})


def _is_remap(value: Any) -> bool:
    if value is None or value == "remap":
        return True  # None: the default backend, remap here
    base = remap.joblib.RemapBackend
    return isinstance(value, base) or (isinstance(value, type) and issubclass(value, base))


_LOKY_CHILD = (
    "a loky worker process never imported remap.joblib, so the backend name 'remap' is "
    "unknown there (true of any backend registered by an import)"
)
_SCRIPT = (
    "runs a child interpreter with backend='remap' that never imports remap.joblib, so joblib "
    "does not know the name"
)
_MEMMAP = (
    "remap does not memory-map large numpy arrays (cores may be on other machines): "
    "arrays travel pickled"
)

#: case (its name, or name[params]) -> why it cannot apply to remap (skipped; in the README)
NOT_APPLICABLE: dict[str, str] = {
    "test_nested_loop[loky-remap]": _LOKY_CHILD,
    "test_backend_nesting_level[parallel_config-remap-loky]": _LOKY_CHILD,
    "test_backend_nesting_level[parallel_backend-remap-loky]": _LOKY_CHILD,
    "test_parallel_with_interactively_defined_functions": _SCRIPT,
    "test_parallel_with_unpicklable_functions_in_args": _SCRIPT,
    "test_auto_memmap_on_arrays_from_generator": _MEMMAP,
    "test_memmapping_leaks": _MEMMAP,
    "test_backend_hinting_and_constraints": (
        "asserts that the default backend (remap here) is loky, and threading for prefer='threads'"
    ),
    "test_threadpool_limitation_in_child_loky": (
        "predicts loky's worker count with effective_n_jobs() of the default backend, which "
        "is remap here (the suites' 4 cores, where loky has one worker per CPU)"
    ),
    "test_threadpool_limitation_in_child_override": (
        "sets OMP_NUM_THREADS (and friends) in the caller and expects workers to see it; remap's "
        "cores keep their node's environment and cap native thread pools at CPUs / cores"
    ),
}

#: case -> why remap differs (expected to fail, strictly; the README's table lists them)
DIFFERENCES: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _on_remap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default backend is remap; a case only about joblib's own backends is skipped."""
    monkeypatch.setattr(parallel, "DEFAULT_BACKEND", "remap")
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    named = [v for k, v in params.items() if k in BACKEND_ARGS]
    if named and not any(_is_remap(v) for v in named):
        pytest.skip("about joblib's own backends only")
    node = request.node
    skip = NOT_APPLICABLE.get(node.name) or NOT_APPLICABLE.get(node.originalname)
    if skip is not None:
        pytest.skip(f"not applicable: {skip}")
    why = DIFFERENCES.get(node.name) or DIFFERENCES.get(node.originalname)
    if why is not None:
        request.node.add_marker(pytest.mark.xfail(reason=why, strict=True))


def test_the_readme_lists_every_difference() -> None:
    """The README's table is the contract: it names every case expected to fail."""
    assert_readme_lists("Differences from joblib's own tests", DIFFERENCES, NOT_APPLICABLE)
