"""Large pickles go through a BytesIO (``remap.blobs.dumps_buffered``): ``pickle.dumps`` grows its
own output by reallocation and costs ~0.5 ms a MiB against ~25 µs (issue 16, 1 MiB calls)."""

from __future__ import annotations

import os
import pickle

import pytest

from remap import api
from remap.blobs import LARGE_PICKLE, dumps, dumps_buffered
from remap.node import core

MIB = 1 << 20


@pytest.mark.parametrize(
    "value", [b"", 3, "x" * 10, [1, 2.5, None], os.urandom(MIB), {"k": os.urandom(LARGE_PICKLE)}]
)
def test_buffered_pickles_are_the_same_pickles(value: object) -> None:
    assert dumps_buffered(value) == pickle.dumps(value, 5) == dumps(value, large=True)
    assert pickle.loads(dumps_buffered(value)) == value


class _NoLargeDumps:
    """Stands in for the ``pickle`` module where a large ``dumps`` must not happen."""

    def __init__(self) -> None:
        self.loads = pickle.loads
        self.PicklingError = pickle.PicklingError

    def dumps(self, obj: object, *args: object) -> bytes:
        data = pickle.dumps(obj, *args)
        assert len(data) < LARGE_PICKLE, "a large pickle went through pickle.dumps"
        return data


def test_a_core_pickles_a_batch_of_large_results_through_a_buffer(monkeypatch) -> None:
    monkeypatch.setattr(core, "pickle", _NoLargeDumps())
    result = os.urandom(MIB)
    (blob,), packed = core._pack_results([result], [])
    assert packed and pickle.loads(blob) == [result]


def test_a_large_argument_is_pickled_through_a_buffer(monkeypatch) -> None:
    monkeypatch.setattr(api, "pickle", _NoLargeDumps())
    arg = os.urandom(MIB)
    assert pickle.loads(api.dumps_argument(arg, "argument 0")) == arg
    assert pickle.loads(api._dumps_plain("s" * MIB, 5)) == "s" * MIB
