"""Callables shipped by value keep their file name and source lines on the core."""

from __future__ import annotations

import functools
import importlib.util
import linecache
import os
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


def _function_in(path: Path, body: str):
    """``f`` compiled from ``body`` as if imported from ``path`` (its code names the file)."""
    path.write_text(body)
    namespace: dict = {}
    exec(compile(body, str(path), "exec"), namespace)
    return namespace["f"]


def test_a_function_submitted_again_reads_its_file_once(tmp_path: Path, monkeypatch) -> None:
    """A function shipped in a loop (a job per ``map_async``) costs one ``stat`` of its file
    per submit, not a ``stat``, another and a read: its text is kept while the file is
    unchanged, and each capture still carries it."""
    from remap import shipping

    src = tmp_path / "loop.py"
    f = _function_in(src, "def f(x):\n    return x + 1\n")
    opened: list[str] = []
    real_open = open

    def counting_open(name, *args, **kwargs):
        opened.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(shipping, "open", counting_open, raising=False)
    for _ in range(5):
        origins, sources = shipping.capture(f)
        assert sources == {str(src): "def f(x):\n    return x + 1\n"}
        assert origins == {("f", 1): str(src)}
    assert opened == [str(src)]


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    """The kept text is the file's as long as its size, time and inode are: an edit of the
    same size (a new time), a longer one, or a new file renamed over it is shipped as it is
    now."""
    from remap import shipping

    src = tmp_path / "edited.py"
    f = _function_in(src, "def f(x):\n    return x + 1\n")
    assert shipping.capture(f)[1][str(src)] == "def f(x):\n    return x + 1\n"
    stamp = src.stat().st_mtime_ns
    src.write_text("def f(x):\n    return x + 2\n")  # the same size
    os.utime(src, ns=(stamp + 1_000_000, stamp + 1_000_000))
    assert shipping.capture(f)[1][str(src)] == "def f(x):\n    return x + 2\n"
    src.write_text("def f(x):\n    return x + 333\n")
    assert shipping.capture(f)[1][str(src)] == "def f(x):\n    return x + 333\n"
    other = tmp_path / "other.py"
    other.write_text("def f(x):\n    return x + 444\n")
    os.utime(other, ns=(src.stat().st_mtime_ns,) * 2)  # only the inode tells them apart
    other.replace(src)
    assert shipping.capture(f)[1][str(src)] == "def f(x):\n    return x + 444\n"
    src.unlink()
    assert shipping.capture(f)[1] == {}  # gone: no text, as before any was kept


def test_kept_texts_are_bounded(tmp_path: Path, monkeypatch) -> None:
    """Functions from many files keep at most ``MAX_KEPT_FILES`` texts, the oldest dropped;
    a file too large to ship, or not UTF-8, is still left out."""
    from remap import shipping

    monkeypatch.setattr(shipping, "_texts", {})
    monkeypatch.setattr(shipping, "MAX_KEPT_FILES", 3)
    fns = [_function_in(tmp_path / f"m{i}.py", f"def f(x):\n    return {i}\n") for i in range(5)]
    for fn in fns:
        shipping.capture(fn)
    assert list(shipping._texts) == [str(tmp_path / f"m{i}.py") for i in (2, 3, 4)]
    monkeypatch.setattr(shipping, "MAX_SOURCE", 10)
    assert shipping.capture(fns[4])[1] == {}
    latin = tmp_path / "latin.py"
    g = _function_in(latin, "def f(x):\n    return 1\n")
    latin.write_bytes(b"def f(x):\n    return '\xe9'\n")
    assert shipping.capture(g)[1] == {}
    assert shipping.capture(g)[1] == {}
