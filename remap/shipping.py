"""Shipping a job's callables to cores, with their file names and source lines intact.

A function pickled by value loses where it came from: cloudpickle 3.1.3 and later name every
such code object ``<dynamic-code>``, and a node rarely has the user's file anyway. So the
blob carries, beside the callables, the origin of every code object reachable from them
(file name by qualified name and first line) and the text of those files; the core puts the
file names back and primes ``linecache`` with the text, so a remote traceback shows the
user's file, line and source line whatever cloudpickle version is installed.

This module is what cores import to unpickle a job: it stays small and imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import functools
import io
import linecache
import os
import pickle
import stat
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

PICKLE_PROTOCOL = 5
MAX_SOURCE = 1 << 20  # bytes of one shipped source file
MAX_SOURCES = 4 << 20  # bytes of all shipped source files
MAX_VISITS = 20_000  # objects walked looking for code
#: remap's own objects carrying a job's functions (call wrappers, a data job's task context,
#: a vertex program) are walked into; so are small containers (a dict of functions)
OWN = "remap."
MAX_CONTAINER = 256

Origins = dict[tuple[str, int], str]


def _code_key(code: types.CodeType) -> tuple[str, int]:
    return (getattr(code, "co_qualname", code.co_name), code.co_firstlineno)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _names(code: types.CodeType) -> Iterator[str]:
    for c in _codes(code):
        yield from c.co_names


def _reachable(roots: tuple[Any, ...]) -> Iterator[types.FunctionType]:
    """Every plain function reachable from the roots through closures, globals used by name,
    defaults, ``functools.partial``, bound methods and the methods of classes (bounded walk)."""
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    visits = 0
    while stack and visits < MAX_VISITS:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visits += 1
        if isinstance(obj, types.FunctionType):
            yield obj
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            glb = obj.__globals__
            stack.extend(glb[n] for n in _names(obj.__code__) if n in glb)
            stack.extend(obj.__defaults__ or ())
            stack.extend((obj.__kwdefaults__ or {}).values())
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None:
                stack.append(wrapped)
        elif isinstance(obj, types.MethodType):
            stack.extend((obj.__func__, obj.__self__))
        elif isinstance(obj, type):
            if obj.__module__ != "builtins":
                stack.extend(vars(obj).values())
        elif isinstance(obj, (staticmethod, classmethod)):
            stack.append(obj.__func__)
        elif isinstance(obj, property):
            stack.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif hasattr(obj, "func") and hasattr(obj, "args") and callable(obj):  # functools.partial
            stack.append(obj.func)
            stack.extend(getattr(obj, "args", ()) or ())
        elif callable(obj) and not isinstance(obj, types.BuiltinFunctionType):
            # an instance with __call__: its class's methods, and what it holds (remap's call
            # wrappers around a user's function, a user's callable object)
            stack.append(type(obj))
            stack.extend(_attributes(obj))
        elif type(obj).__module__.startswith(OWN):  # what remap carries a job's functions in
            stack.extend(_attributes(obj))
        elif isinstance(obj, (dict, list, tuple)) and len(obj) <= MAX_CONTAINER:
            stack.extend(obj.values() if isinstance(obj, dict) else obj)


def _attributes(obj: Any) -> list[Any]:
    """An instance's attribute values (``__dict__`` and ``__slots__``), read without code."""
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            descriptor = cls.__dict__.get(name)
            if isinstance(descriptor, types.MemberDescriptorType):
                with contextlib.suppress(AttributeError):  # an empty slot
                    values.append(descriptor.__get__(obj, cls))
    return values


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


#: file name → (what ``os.stat`` said of it: mtime in ns, size, inode; its text, or None if it
#: would not read as UTF-8): a job submitted in a loop reads its function's file once, not per
#: submit, and a file that changed since (another stat key) is read again
_texts: dict[str, tuple[tuple[int, int, int], str | None]] = {}
#: files whose text is kept at most (the oldest read is forgotten first)
MAX_KEPT_FILES = 64
_texts_lock = threading.Lock()


def _source_text(filename: str, room: int) -> str | None:
    """``filename``'s text if it is a regular file of at most ``room`` bytes that reads as
    UTF-8; one ``stat`` when its size, time and inode are those of the text kept for it."""
    try:
        info = os.stat(filename)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > room:
        return None
    key = (info.st_mtime_ns, info.st_size, info.st_ino)
    kept = _texts.get(filename)
    if kept is not None and kept[0] == key:
        return kept[1]
    try:
        with open(filename, encoding="utf-8") as f:
            text: str | None = f.read()
    except UnicodeDecodeError:
        text = None
    except OSError:
        return None  # (not kept: it may read next time)
    with _texts_lock:  # (callers on several threads)
        _texts.pop(filename, None)
        while len(_texts) >= MAX_KEPT_FILES:
            del _texts[next(iter(_texts))]
        _texts[filename] = (key, text)
    return text


def capture(*roots: Any) -> tuple[Origins, dict[str, str]]:
    """The origin of every code object reachable from the roots, and the text of their files."""
    origins: Origins = {}
    sources: dict[str, str] = {}
    looked: set[str] = set()
    budget = MAX_SOURCES
    for fn in _reachable(roots):
        for code in _codes(fn.__code__):
            filename = code.co_filename
            if filename.startswith("<") or not filename:
                continue
            origins[_code_key(code)] = filename
            if filename in looked:
                continue
            looked.add(filename)
            text = _source_text(filename, min(MAX_SOURCE, budget))
            if text is not None:
                sources[filename] = text
                budget -= len(text)
    return origins, sources


def _renamed(code: types.CodeType, origins: Origins) -> types.CodeType:
    consts = tuple(
        _renamed(c, origins) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    filename = code.co_filename
    if filename.startswith("<"):  # pickled by value; code imported on the node keeps its own name
        filename = origins.get(_code_key(code), filename)
    if filename == code.co_filename and consts == code.co_consts:
        return code
    return code.replace(co_filename=filename, co_consts=consts)


def restore(roots: tuple[Any, ...], origins: Origins, sources: dict[str, str]) -> None:
    """Put the file names back on the unpickled callables' code and prime ``linecache``."""
    if origins:
        for fn in list(_reachable(roots)):
            code = fn.__code__
            renamed = _renamed(code, origins)
            if renamed is not code:
                fn.__code__ = renamed
    for filename, text in sources.items():
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        # mtime None: linecache.checkcache keeps the entry (the node may have no such file)
        linecache.cache[filename] = (len(text), None, lines, filename)


#: the directory of remap's own code, whose frames above the user's say nothing to them
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback from the user's first frame on: remap's own frames above it (the
    core, a call wrapper, a data task's loop) are left out, unless nothing else is there. An
    error of remap's that only says where the user's exception happened (``shows_cause``: a
    data job's bad record, a vertex that raised) shows that exception instead."""
    if getattr(exc, "shows_cause", False) and exc.__cause__ is not None:
        exc = exc.__cause__
    start = exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, user_frames(start) or start))


def user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` from the user's first frame on (None: only remap's own frames)."""
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_DIR):
        tb = tb.tb_next
    return tb


def _proxy_reduce(obj: Any) -> Any:
    """A ``multiprocessing.Manager`` proxy pickled with its manager's authkey, as
    multiprocessing pickles it for a child it spawns: without it the core (whose own authkey
    is random) is refused by the manager. Only proxies carry the key, and only to the cores
    that run the calls holding them, over the cluster's authenticated links."""
    managers = sys.modules.get("multiprocessing.managers")
    if managers is None or not isinstance(obj, managers.BaseProxy):
        return NotImplemented
    rebuild, (func, token, serializer, kwds) = obj.__reduce__()
    return rebuild, (func, token, serializer, {**kwds, "authkey": bytes(obj._authkey)})


@functools.cache
def _pickler() -> type:
    import cloudpickle  # the client's; cores only unpickle

    class Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            reduced = _proxy_reduce(obj)
            if reduced is not NotImplemented:
                return reduced
            return super().reducer_override(obj)

    return Pickler


def dumps_for_cores(obj: Any) -> bytes:
    """cloudpickle, and Manager proxies keep working on the cores (:func:`_proxy_reduce`)."""
    out = io.BytesIO()
    _pickler()(out, protocol=PICKLE_PROTOCOL).dump(obj)
    return out.getvalue()


def function_blob(fn: Callable[..., Any], reduce_fn: Callable[..., Any] | None = None) -> bytes:
    """Pickle a job's callables by value where needed, with their origins; may raise."""
    origins, sources = capture(fn, reduce_fn)
    return dumps_for_cores((fn, reduce_fn, origins, sources))


def load_function_blob(payload: bytes | memoryview) -> tuple[Any, Any]:
    """The callables of a :func:`function_blob`, with file names and source lines restored."""
    import cloudpickle  # noqa: F401  (registers what by-value pickles need)

    fn, reduce_fn, origins, sources = pickle.loads(payload)
    restore((fn, reduce_fn), origins, sources)
    return fn, reduce_fn
