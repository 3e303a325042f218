"""Callables shipped by value keep their file name and source lines on the core."""

from __future__ import annotations

import functools
import importlib.util
import linecache
import sys
import traceback
from pathlib import Path

import cloudpickle

from remap.shipping import function_blob, load_function_blob


def _load_user_module(tmp_path: Path, name: str = "usermod"):
    src = tmp_path / f"{name}.py"
    src.write_text(
        "def helper(x):\n"
        "    raise ValueError(f'bad {x}')\n"
        "\n"
        "def f(x):\n"
        "    return helper(x) + 1\n"
        "\n"
        "class Scaler:\n"
        "    def __call__(self, x):\n"
        "        raise KeyError(x)\n"
    )
    spec = importlib.util.spec_from_file_location(name, src)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return src, module


def _remote_traceback(fn, arg, tmp_path: Path, src: Path) -> str:
    """Unpickle as a core would, with the user's file gone and linecache cold."""
    blob = function_blob(fn)
    src.rename(tmp_path / "moved.py")  # the node has no copy of the file
    linecache.clearcache()
    loaded, _ = load_function_blob(blob)
    try:
        loaded(arg)
    except Exception as exc:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    raise AssertionError("the shipped function did not raise")


def test_a_function_shipped_by_value_names_its_file_line_and_source(tmp_path: Path) -> None:
    """The traceback of a by-value function names the user's file, line and source text,
    whatever file name the installed cloudpickle gives dynamic code."""
    src, module = _load_user_module(tmp_path)
    try:
        tb = _remote_traceback(module.f, 3, tmp_path, src)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules["usermod"]
    assert f'File "{src}", line 5, in f' in tb
    assert f'File "{src}", line 2, in helper' in tb, "functions reached through globals too"
    assert "raise ValueError(f'bad {x}')" in tb, "the source line comes with the blob"
    assert "<dynamic-code>" not in tb


def test_callable_instances_and_lambdas_keep_their_origin(tmp_path: Path) -> None:
    """A callable object's method and a closure keep their file name too."""
    src, module = _load_user_module(tmp_path, "usermod2")
    try:
        tb = _remote_traceback(module.Scaler(), 1, tmp_path, src)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules["usermod2"]
    assert f'File "{src}", line 9, in __call__' in tb
    assert "raise KeyError(x)" in tb


def test_imported_functions_are_left_alone() -> None:
    """A function imported by reference on the core keeps the core's own file name."""
    import json

    loaded, reduce_fn = load_function_blob(function_blob(json.dumps, json.loads))
    assert loaded is json.dumps and reduce_fn is json.loads


def test_functions_inside_remaps_call_wrappers_keep_their_origin(tmp_path: Path) -> None:
    """``Executor.submit`` and ``Pool`` ship the user's function inside remap's wrappers
    (``Apply``, ``Initialized``): the traceback still names the user's file and source line,
    never ``<dynamic-code>``."""
    from remap.calls import Apply

    src, module = _load_user_module(tmp_path, "usermod3")
    try:
        tb = _remote_traceback(Apply(module.f), ((3,), {}), tmp_path, src)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules["usermod3"]
    assert f'File "{src}", line 5, in f' in tb
    assert "raise ValueError(f'bad {x}')" in tb
    assert "<dynamic-code>" not in tb


def test_a_vertex_programs_functions_keep_their_origin(tmp_path: Path) -> None:
    """A vertex job's program (and a data job's task context) carries the user's functions
    in remap's own objects and dicts: the walk reaches them, so a worker's traceback names
    the user's file and line."""
    from remap.vertex.program import Program

    src, module = _load_user_module(tmp_path, "usermod4")
    try:
        blob = function_blob(
            Program(prepare=module.f, compute=module.f, aggregators={"a": module.f})
        )
        src.rename(tmp_path / "moved.py")
        linecache.clearcache()
        program, _ = load_function_blob(blob)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules["usermod4"]
    for fn in (program.compute, program.aggregators["a"]):
        try:
            fn(3)
        except ValueError as exc:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        assert f'File "{src}", line 2, in helper' in tb and "<dynamic-code>" not in tb, tb


def test_a_user_traceback_starts_at_the_users_frame_and_shows_the_wrapped_error() -> None:
    """Remap's frames above the user's are left out; an error of remap's that only says where
    (a data job's bad record) shows the user's exception; remap's own bug keeps its frames."""
    from remap.data.tasks import RecordError
    from remap.shipping import user_traceback

    def users_map(line: str) -> None:
        raise ValueError(f"bad {line}")

    try:
        try:
            functools.reduce(lambda _, line: users_map(line), ["x"], None)
        except ValueError as exc:
            raise RecordError("in.txt:1: map raised ValueError: bad x") from exc
    except RecordError as exc:
        tb = user_traceback(exc)
    assert tb.startswith('Traceback (most recent call last):\n  File "' + __file__), tb
    assert "in users_map" in tb and tb.rstrip().endswith("ValueError: bad x"), tb
    assert "RecordError" not in tb and "direct cause" not in tb, tb
