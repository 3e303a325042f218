"""The Python API's argument checks that refuse a mistake before anything connects or starts:
one clear exception each, no cluster made (no sockets, no processes)."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

import remap
from remap import api


def square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("cores", [0, -2, "2", 1.5, True])
def test_connect_refuses_cores_that_are_not_a_positive_integer(cores: Any) -> None:
    """``remap.connect(cores=...)`` is checked before any cluster starts."""
    with pytest.raises(ValueError, match=f"cores must be a positive integer, not {cores!r}"):
        remap.connect(cores=cores)


def test_a_job_function_that_is_not_callable_is_a_type_error() -> None:
    """A function or reduce that is no callable is named as it is."""
    with pytest.raises(TypeError, match="^5 is not callable$"):
        api.function_blob(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^'add' is not callable$"):
        api.function_blob(square, "add")  # type: ignore[arg-type]


def test_a_reduce_that_cannot_travel_is_the_one_named() -> None:
    """The job's function pickles but its reduce holds a lock: the error names the reduce."""
    lock = threading.Lock()

    def fold(a: int, b: int) -> int:
        with lock:
            return a + b

    with pytest.raises(pickle.PicklingError) as info:
        api.function_blob(square, fold)
    assert str(info.value) == (
        "function tests.test_api_checks.test_a_reduce_that_cannot_travel_is_the_one_named."
        "<locals>.fold cannot be sent to the cluster: TypeError: cannot pickle '_thread.lock' "
        "object"
    )


@pytest.mark.parametrize("make", [remap.Executor, remap.Pool])
def test_a_cluster_and_connection_arguments_together_are_refused(make: Any) -> None:
    """``Executor(cluster=c, address)`` or with connection keywords: which one was meant is
    not guessed."""
    borrowed: Any = object()
    with pytest.raises(TypeError, match="give either cluster= or connection arguments, not both"):
        make(address="127.0.0.1:7878", cluster=borrowed)
    with pytest.raises(TypeError, match="not both"):
        make(cluster=borrowed, retries=1)
