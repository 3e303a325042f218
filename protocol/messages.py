"""The message catalogue: one frozen dataclass per message type (README.md, section 3).

Control fields travel in the msgpack header as ``{"t": TYPE, field: value, ...}``; ``payload``
is the frame's opaque payload (pickles back to back, lengths in ``sizes``), so the server
splits and merges batches at argument boundaries without unpickling anything.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from . import framing as _framing
from .checks import NAMESPACE as _CHECK_NAMES
from .checks import checker as _checker
from .checks import expression as _expression
from .errors import (
    InvalidOption,
    LocalProtocolError,
    RemoteProtocolError,
    UnknownMessageType,
    VersionMismatch,
)
from .framing import DEFAULT_MAX_FRAME
from .options import JobOptions
from .status import JobStatus, NodeStatus, ServerStatus

#: bump whenever the catalogue's fingerprint (:func:`catalogue_fingerprint`) changes, so peers of
#: different catalogues refuse each other at the hello instead of failing mid-job
PROTOCOL_VERSION = 5

#: arguments a console may send before ``submitted`` (with ``job = -submit.id``): no round trip
INITIAL_WINDOW = 256
#: payload bytes of arguments before the first ``grant`` (else 256 arguments of 4 MB are 1 GB)
INITIAL_WINDOW_BYTES = 16 * 1024 * 1024
#: most arguments in one pickle of an argument group: at most the first window, so a console
#: holding a whole group can always send it
MAX_GROUP = INITIAL_WINDOW
#: bytes an argument group may have while its console knows no bound (``group_limit``)
EARLY_GROUP_BYTES = 4096

ROLES = ("node", "console")


class Message:
    """Base of every message; subclasses are registered by their ``TYPE``."""

    TYPE: ClassVar[str] = ""
    #: messages allowed before both sides are authenticated
    PREAUTH: ClassVar[bool] = False
    #: "wire", "pipe" (a node and its cores) or "both"; refused as unknown on the other channel
    CHANNEL: ClassVar[str] = "wire"
    #: ``cls(**fields)`` without ``__init__`` (:func:`_codecs`), generated on first use
    make: ClassVar[Any]
    payload: bytes

    # a frozen dataclass's, written once here: generated per message (3 compiles each), they
    # were an eighth of a core's start (:func:`message`)
    def _values(self) -> list[Any]:
        return [getattr(self, name) for name in self.__slots__]  # the fields, in order

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(tuple(self._values()))

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}" for name, value in zip(self.__slots__, self._values())
        )
        return f"{type(self).__qualname__}({shown})"


_REGISTRY: dict[str, type[Message]] = {}
_MISSING = dataclasses.MISSING


def message(cls):
    """Class decorator: make a frozen dataclass and register it in the catalogue; its codecs
    and ``make`` are generated when first used (:func:`_generate`), so a process builds only
    those of the messages it sends or reads (a core: the pipe's few)."""
    cls = dataclass(frozen=True, slots=True, eq=False, repr=False)(cls)  # (Message's)
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise TypeError(f"message type {cls.TYPE!r} missing or registered twice")
    _REGISTRY[cls.TYPE] = cls
    return cls


def _generate(cls: type[Message]) -> None:
    """Generate ``cls``'s encoder, decoders and ``make`` from its fields."""
    encoder, decoder, _SHAPERS[cls], make = _codecs(cls)
    cls.make = make if make is cls else staticmethod(make)
    shapes: dict[tuple[str, ...], Any] = {}
    for channel, known in _CHANNELS.items():
        if cls.CHANNEL in (channel, "both"):
            known[cls.TYPE] = (cls, decoder, shapes)
    _ENCODERS[cls] = encoder  # last: another thread finding it finds the rest too


class _Make:
    """``Message.make`` until a class's own is generated (:func:`_generate`)."""

    def __get__(self, msg: Any, cls: type[Message]) -> Any:
        _generate(cls)
        return cls.make


Message.make = _Make()


def _builder(cls: type) -> type:
    """A plain class of ``cls``'s layout: a message is built as one by plain stores, then
    becomes a ``cls`` by ``__class__`` assignment. A frozen dataclass's slot is otherwise set
    through ``object.__setattr__``, five times a store, on every call's messages."""
    return type(
        f"{cls.__name__}Builder",
        cls.__bases__,
        {"__slots__": cls.__slots__, "__module__": cls.__module__},
    )


def _built(values: list[tuple[str, str]]) -> list[str]:
    """Generated lines building ``msg`` from ``(slot, expression)`` pairs (:func:`_builder`)."""
    return [
        "    msg = _new(_Builder)",
        *(f"    msg.{slot} = {value}" for slot, value in values),
        "    msg.__class__ = _cls",
    ]


#: per class, generated on first use: msg → (header bytes, payload)
_ENCODERS: dict[type[Message], Any] = {}
#: per class: header keys (in order, without "t") → a decoder for maps of exactly those keys
_SHAPERS: dict[type[Message], Any] = {}
#: per channel: type name → (class, decoder, decoders of the header shapes seen, by keys), for
#: the classes generated (:func:`_generate`)
_CHANNELS: dict[str, dict[str, tuple[type[Message], Any, dict[tuple[str, ...], Any]]]] = {
    "wire": {},
    "pipe": {},
}
#: header shapes learned per message type at most (a peer may send keys in any order)
SHAPES = 8
_unpackb = msgpack.unpackb
#: what a header may declare before authentication (the handshake's maps have at most 8 keys
#: and no arrays; the room lets a later message sent early be named as such)
_PREAUTH_LIMITS = {"max_array_len": 64, "max_map_len": 64, "max_ext_len": 0}
_THREAD = threading.local()  # a msgpack Packer per thread: building one per message costs more


def _new_packer() -> msgpack.Packer:
    _THREAD.packer = msgpack.Packer(use_bin_type=True)
    return _THREAD.packer


def _problem(name: str, field_name: str, value: Any) -> RemoteProtocolError:
    """What is wrong with a required field a generated decoder refused."""
    if value is _MISSING:
        return RemoteProtocolError(f"{name}: missing field {field_name!r}")
    return RemoteProtocolError(f"{name}.{field_name}: bad value of type {type(value).__name__}")


def _test(f: dataclasses.Field, hint: Any, namespace: dict[str, Any]) -> str:
    """The check of a field's value (``f_<name>`` in the generated decoders) as an expression:
    inline for the usual types, else a call of a check this puts in ``namespace``."""
    if "rule" in f.metadata:  # a job option is judged by its own rule (``__post_init__``)
        return "True"
    record = f.metadata.get("record")  # a status record's map, against the record's fields
    if record is None:
        test = _expression(hint, f"f_{f.name}")
        if test is not None:
            return test
        check = _checker(hint)
    elif typing.get_origin(hint) is list:
        check = lambda v: type(v) is list and not any(map(record.problem, v))  # noqa: E731
    else:
        check = lambda v: not record.problem(v)  # noqa: E731
    namespace[f"_check_{f.name}"] = check
    return f"_check_{f.name}(f_{f.name})"


def _codecs(cls: type) -> tuple[Any, Any, Any, Any]:
    """Generate ``cls``'s encoder, decoder, shaped-decoder maker and ``make`` from its fields."""
    name = cls.TYPE
    hints = typing.get_type_hints(cls)
    namespace: dict[str, Any] = {
        **_CHECK_NAMES,
        "_problem": _problem,
        "_cls": cls,
        "_MISSING": _MISSING,
        "_Remote": RemoteProtocolError,
        "_THREAD": _THREAD,
        "_new_packer": _new_packer,
    }
    #: per field: its check; per optional field: its default's expression (a fresh list or
    #: dict each time)
    tests: dict[str, str] = {}
    freshes: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name == "payload":
            continue
        tests[f.name] = _test(f, hints[f.name], namespace)
        default = f.default if f.default_factory is _MISSING else f.default_factory
        if default is _MISSING:
            continue
        namespace[f"_default_{f.name}"] = default
        if default in (list, dict):
            freshes[f.name] = "[]" if default is list else "{}"
        else:
            freshes[f.name] = f"_default_{f.name}()" if callable(default) else f"_default_{f.name}"
    fields = list(tests)
    required = [f for f in fields if f not in freshes]
    namespace["_NAMES"] = frozenset(fields)
    # the fields before the first optional one go in the dict display; the rest in order
    leading = next((i for i, f in enumerate(fields) if f in freshes), len(fields))
    header = ", ".join([f"'t': {name!r}", *(f"{f!r}: msg.{f}" for f in fields[:leading])])
    has_payload = "payload" in cls.__dataclass_fields__
    payload = "msg.payload" if has_payload else "b''"
    encoder = [
        "def encode(msg):",
        "    packer = getattr(_THREAD, 'packer', None) or _new_packer()",
        f"    header = {{{header}}}",
    ]
    # a field at its default is left out: fewer keys to pack, unpack and check
    for f in fields[leading:]:
        fresh = freshes.get(f)
        if fresh is None:
            encoder.append(f"    header[{f!r}] = msg.{f}")
            continue
        default = namespace[f"_default_{f}"]
        if fresh in ("[]", "{}"):
            test = "v"
        elif default is None or type(default) is bool:
            test = f"v is not {default!r}"
        else:
            test = f"v != {fresh}"
        encoder += [f"    v = msg.{f}", f"    if {test}:", f"        header[{f!r}] = v"]
    encoder.append(f"    return packer.pack(header), {payload}")
    # a required field's check also refuses the missing sentinel (``_problem`` says which); a
    # map of the required fields alone takes the defaults without look-ups; unknown fields
    # are found in one C pass at the end
    decoder = ["def decode(data, payload):"]
    for f in required:
        decoder += [
            f"    f_{f} = data.get({f!r}, _MISSING)",
            f"    if f_{f} is _MISSING or not ({tests[f]}):",
            f"        raise _problem({name!r}, {f!r}, f_{f})",
        ]
    if freshes:
        decoder.append(f"    if len(data) == {len(required)}:")
        decoder += [f"        f_{f} = {fresh}" for f, fresh in freshes.items()]
        decoder.append("    else:")
        for f, fresh in freshes.items():
            decoder += [
                f"        f_{f} = data.get({f!r}, _MISSING)",
                f"        if f_{f} is _MISSING:",
                f"            f_{f} = {fresh}",
                f"        elif not ({tests[f]}):",
                f"            raise _problem({name!r}, {f!r}, f_{f})",
            ]
    decoder += [
        "    if not _NAMES.issuperset(data):",
        "        unknown = sorted(map(str, (k for k in data if k not in _NAMES)))[:5]",
        f"        raise _Remote({f'{name}: unknown field(s) '!r} + str(unknown))",
    ]
    if not has_payload:
        decoder += ["    if payload:", f"        raise _Remote({f'{name} carries no payload'!r})"]
    slots = [*fields, "payload"] if has_payload else fields
    values = [(f, "payload" if f == "payload" else f"f_{f}") for f in slots]
    if hasattr(cls, "__post_init__"):  # its own rules judge the values: through __init__
        build = [f"    return _cls({', '.join(f'{f}={v}' for f, v in values)})"]
    else:
        build = [*_built(values), "    return msg"]
        namespace["_new"] = object.__new__
        namespace["_Builder"] = _builder(cls)
        # ``make(**fields)``: ``cls(**fields)`` built as the decoders build theirs, for the
        # messages of every call; a default made fresh (a list) is made when not given
        fresh = {f: e for f, e in freshes.items() if e != f"_default_{f}"}
        params = [
            f if f in required else f"{f}={'_MISSING' if f in fresh else freshes[f]}"
            for f in fields
        ]
        if has_payload:
            namespace["_default_payload"] = cls.__dataclass_fields__["payload"].default
            params.append("payload=_default_payload")
        made = [(f, f"{fresh[f]} if {f} is _MISSING else {f}" if f in fresh else f) for f in slots]
        maker = [f"def make(*, {', '.join(params)}):", *_built(made), "    return msg"]
        exec("\n".join(maker), namespace)  # noqa: S102 - our own source text
    decoder += build
    exec("\n".join(encoder), namespace)  # noqa: S102 - our own source text, as dataclasses does
    exec("\n".join(decoder), namespace)  # noqa: S102
    general = namespace["decode"]

    def shaped(keys: tuple[str, ...]) -> Any:
        """A decoder for header maps of exactly ``keys`` (a shape the general decoder took):
        subscripts, one expression of checks, defaults without look-ups. A map that fails
        goes to the general decoder, which says what is wrong."""
        present = set(keys)
        code = ["def decode(data, payload):"]
        code += [f"    f_{f} = data[{f!r}]" for f in fields if f in present]
        checks = [f"({tests[f]})" for f in fields if f in present]
        if not has_payload:
            checks.append("not payload")
        if checks:
            code += [
                f"    if not ({' and '.join(checks)}):",
                "        return _general(data, payload)",
            ]
        code += [f"    f_{f} = {freshes[f]}" for f in fields if f not in present]
        local = {**namespace, "_general": general}
        exec("\n".join(code + build), local)  # noqa: S102 - our own source text
        return local["decode"]

    return namespace["encode"], general, shaped, namespace.get("make", cls)


def encode(msg: Message) -> tuple[bytes, bytes]:
    """Return ``(header, payload)`` for a message."""
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        if _REGISTRY.get(getattr(msg, "TYPE", None)) is not type(msg):
            raise LocalProtocolError(f"{type(msg).__name__} is not a registered message")
        _generate(type(msg))
        encoder = _ENCODERS[type(msg)]
    try:
        return encoder(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {msg.TYPE}: {exc}") from exc


def decode(
    header: bytes, payload: bytes, *, preauth: bool = False, channel: str = "wire"
) -> Message:
    """Parse and validate a header; raise RemoteProtocolError on anything malformed."""
    try:
        # msgpack's defaults (>= 1.0: str as str, arrays as lists) suit: keywords cost a parse.
        # Before authentication: small limits, so nested arrays declaring the header's length
        # are refused before msgpack builds them (8 KiB of them cost 64 MiB and 79 ms)
        data = _unpackb(header, **_PREAUTH_LIMITS) if preauth else _unpackb(header)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RemoteProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None
    if type(data) is not dict:
        raise RemoteProtocolError("header is not a map")
    type_name = data.pop("t", None)
    if type(type_name) is not str:
        raise RemoteProtocolError("header has no message type")
    known = _CHANNELS[channel].get(type_name)
    if known is None:
        cls = _REGISTRY.get(type_name)
        if cls is None or cls.CHANNEL not in (channel, "both"):
            re = data.get("id")
            raise UnknownMessageType(type_name[:64], re if type(re) is int else None)
        _generate(cls)
        known = _CHANNELS[channel][type_name]
    cls, decoder, shapes = known
    if preauth and not cls.PREAUTH:
        raise RemoteProtocolError(f"message {type_name!r} is not allowed before authentication")
    keys = tuple(data)
    try:
        shaped = shapes.get(keys)
        if shaped is not None:  # a header of a shape seen before: its own decoder
            return shaped(data, payload)
        msg = decoder(data, payload)
    except InvalidOption as exc:  # a value its own rules refuse (``submit``'s options)
        raise RemoteProtocolError(f"{type_name}.{exc}") from None
    except RemoteProtocolError:
        # another version's hello or challenge may have other fields: say the version differs
        if cls.PREAUTH and type(data.get("version")) is int:
            check_version(data["version"])
        raise
    if len(shapes) < SHAPES:  # every key is a field: learn the shape
        shapes[keys] = _SHAPERS[cls](keys)
    return msg


def check_version(version: int) -> None:
    """VersionMismatch unless a peer's hello or challenge says this side's protocol version."""
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        )


def message_types() -> dict[str, type[Message]]:
    """The catalogue, for documentation and tests."""
    return dict(_REGISTRY)


def _default_text(f: dataclasses.Field) -> str:
    """A field's default as stable text (never a repr holding an address)."""
    if f.default_factory is not _MISSING:
        return f"factory {f.default_factory.__qualname__}"
    value = f.default
    if value is _MISSING:
        return "required"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if value is None or type(value) in (bool, int, float, str, bytes, tuple):
        return repr(value)
    return type(value).__name__


def _fields_text(cls: type) -> list[list[str]]:
    """``[name, declared type, default]`` per field, in declaration order (it is the encoder's)."""
    return [[f.name, str(f.type), _default_text(f)] for f in dataclasses.fields(cls)]


def _enums(hint: Any, found: dict[str, list[str]]) -> None:
    """Collect the enumerations inside a type hint: their values travel on the wire."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        found[hint.__name__] = [str(member.value) for member in hint]
    for arg in typing.get_args(hint):
        _enums(arg, found)


def catalogue_description() -> dict[str, Any]:
    """What peers must agree on, as plain data: every message's wire name, channel, whether it
    may come before authentication and its fields (name, declared type, default); the status
    records carried inside ``status``; the enumerations' values; the frame format's constants."""
    messages, records, enums = {}, {}, {}
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        for hint in typing.get_type_hints(cls).values():
            _enums(hint, enums)
        messages[name] = {
            "channel": cls.CHANNEL,
            "preauth": cls.PREAUTH,
            "fields": _fields_text(cls),
        }
        for f in dataclasses.fields(cls):
            record = f.metadata.get("record")
            if record is not None:
                records[record.__name__] = _fields_text(record)
    return {
        "messages": messages,
        "records": dict(sorted(records.items())),
        "enums": dict(sorted(enums.items())),
        "frame": {
            "prefix": _framing._PREFIX.format,
            "preauth_max_frame": _framing.PREAUTH_MAX_FRAME,
            "default_max_frame": _framing.DEFAULT_MAX_FRAME,
            "max_header": _framing.MAX_HEADER,
            "mac_size": _framing.MAC_SIZE,
        },
    }


def catalogue_fingerprint() -> str:
    """SHA-256 (hex, first 16 characters) of :func:`catalogue_description` as sorted JSON: a
    test pins it with ``PROTOCOL_VERSION``, so a catalogue change cannot ship unversioned."""
    import hashlib  # here: a core never needs it (nor json)
    import json

    text = json.dumps(catalogue_description(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- handshake


@message
class Hello(Message):
    """Client → server: what the handshake needs and my fresh nonce; nothing more, since any
    server dialled reads it (my versions are in :class:`About`, for a server that proved itself)."""

    TYPE = "hello"
    PREAUTH = True
    version: int
    role: str
    nonce: bytes
    #: a console authenticating with a person's key (``connection.person_key``); "": the secret
    user: str = ""


@message
class Challenge(Message):
    """Server → client: my protocol version, my nonce, and my proof over your nonce (my Python
    and cloudpickle versions are no one's business before their proof)."""

    TYPE = "challenge"
    PREAUTH = True
    version: int
    nonce: bytes
    proof: bytes


@message
class Auth(Message):
    """Client → server: my proof over the whole transcript."""

    TYPE = "auth"
    PREAUTH = True
    proof: bytes


@message
class About(Message):
    """Client → server, sealed, right after its auth: what the server checks and keeps, told
    only to a server that proved the secret."""

    TYPE = "about"
    PREAUTH = True
    python: str
    cloudpickle: str
    #: the largest frame this client accepts (left out at the default)
    max_frame: int = DEFAULT_MAX_FRAME


@message
class Welcome(Message):
    """Server → client: authenticated; the limits in force from now on."""

    TYPE = "welcome"
    PREAUTH = True
    session: str
    max_frame: int
    heartbeat: float


@message
class Error(Message):
    """Either way: a request failed (``re`` set) or the connection is being closed."""

    TYPE = "error"
    PREAUTH = True
    code: str
    message: str
    re: int | None = None


# --------------------------------------------------------------------------- liveness


@message
class Heartbeat(Message):
    """Either way, every heartbeat interval; any frame also counts as a sign of life."""

    TYPE = "heartbeat"
    load: float = 0.0
    busy: int = 0


# --------------------------------------------------------------------------- node ↔ server


@message
class NodeInfo(Message):
    """Node → server, once after authentication: the facts the scheduler needs."""

    TYPE = "node_info"
    host: str
    pid: int
    cores: int
    memory: int
    group: str | None = None
    load: float = 0.0
    modules: list[str] | None = None
    data_dir: str | None = None
    data_id: str | None = None
    data_error: str | None = None


@message
class JobLoad(Message):
    """Server → node: a job's function (cloudpickle of ``(fn, reduce_fn)``), sent once per node."""

    TYPE = "job_load"
    job: int
    star: bool = False
    timeout: float | None = None
    reduce: bool = False
    payload: bytes = b""


@message
class JobDrop(Message):
    """Server → node: the job is over; forget its function."""

    TYPE = "job_drop"
    job: int


@message
class Task(Message):
    """Server → node, and node → core: a batch of pickled arguments; with ``groups``, the
    ``count`` arguments after the first ``skip`` of the groups' lists (README, section 6)."""

    TYPE = "task"
    CHANNEL = "both"  # the node hands a core the server's task as it came (its job loaded before)
    task: int
    job: int
    sizes: list[int]
    groups: list[int] = field(default_factory=list)
    skip: int = 0
    count: int = -1
    payload: bytes = b""


@message
class TaskResult(Message):
    """Node → server (and core → node): a batch's results, positionally; ``errors``,
    ``partial``, ``packed`` and ``part`` (a streamed part) as README section 6 says."""

    TYPE = "result"
    CHANNEL = "both"  # a core answers its node with it; the node passes it on
    task: int
    sizes: list[int]
    errors: list[list[Any]] = field(default_factory=list)
    elapsed: float = 0.0
    output: str = ""
    partial: bool = False
    packed: bool = False
    part: int = 0
    payload: bytes = b""


@message
class TaskFailed(Message):
    """Node → server: a batch did not finish (crash, timeout, kill); ``at`` is the running
    argument (-1: unknown), or with ``span`` > 1 one of ``at .. at + span - 1``."""

    TYPE = "task_failed"
    task: int
    reason: str
    at: int = -1
    span: int = 1
    message: str = ""


@message
class Cancel(Message):
    """Server → node: stop everything of this job now (kill the cores running it)."""

    TYPE = "cancel"
    job: int


@message
class Shutdown(Message):
    """Server → node: exit (the cluster is being stopped)."""

    TYPE = "shutdown"
    reason: str = ""


@message
class Goodbye(Message):
    """Node → server, its last message: it stops as asked, so the close that follows is no
    loss (its work is re-queued at once, nothing logged as lost)."""

    TYPE = "goodbye"
    reason: str = ""


# --------------------------------------------------------------------------- node ↔ core (a pipe)


@message
class CoreReady(Message):
    """Core → node, once: the process started and waits for commands."""

    TYPE = "core_ready"
    CHANNEL = "pipe"
    pid: int


@message
class CoreLoad(Message):
    """Node → core: a job's function blob (``job_load``'s payload), before its first batch here."""

    TYPE = "core_load"
    CHANNEL = "pipe"
    job: int
    star: bool = False
    timed: bool = False  # the job has a timeout: mark every call
    reduce: bool = False  # fold each batch's results
    payload: bytes = b""


@message
class CoreDrop(Message):
    """Node → core: forget a job's function."""

    TYPE = "core_drop"
    CHANNEL = "pipe"
    job: int


# --------------------------------------------------------------------------- console ↔ server


@message
class Submit(JobOptions, Message):
    """Console → server: start a job; payload is the cloudpickled ``(fn, reduce_fn)``; the
    fields are the job's options (:class:`~protocol.options.JobOptions`), the request id and
    the argument count (-1: unknown)."""

    TYPE = "submit"
    id: int
    total: int = -1
    payload: bytes = b""

    @classmethod
    def of(cls, options: JobOptions, *, id: int, total: int = -1, payload: bytes = b"") -> Submit:
        """The submit message for ``options``."""
        return cls(id=id, total=total, payload=payload, **options.fields())


@message
class Submitted(Message):
    """Server → console: the job's id and the first window of arguments it may send."""

    TYPE = "submitted"
    re: int
    job: int
    window: int


@message
class Args(Message):
    """Console → server: arguments from ``start`` on, pickled back to back; with ``groups``
    pickle ``i`` is a list of ``groups[i]`` arguments."""

    TYPE = "args"
    job: int
    start: int
    sizes: list[int]
    groups: list[int] = field(default_factory=list)
    payload: bytes = b""

    @property
    def count(self) -> int:
        """How many arguments the message carries."""
        return sum(self.groups) if self.groups else len(self.sizes)


@message
class ArgsEnd(Message):
    """Console → server: no more arguments; the job has ``total`` of them. With an ``id``
    (a detached job's console, which leaves next) it is a request: ``ok`` answers once the
    server holds every argument where a restart finds it (its journal), or says it does not."""

    TYPE = "args_end"
    job: int
    total: int
    id: int = 0


@message
class Grant(Message):
    """Server → console: you may send ``count`` more arguments of this job."""

    TYPE = "grant"
    job: int
    count: int


@message
class GroupLimit(Message):
    """Server → console: the largest argument group worth sending for this job (a larger
    one fits no node that may run it); sent when nodes with smaller frames make it matter."""

    TYPE = "group_limit"
    job: int
    #: bytes a group's pickle may have at most; 0: no bound (no node with smaller frames)
    max_bytes: int


@message
class Hold(Message):
    """Console → server: stop dispatching this job's calls (``held``: its console holds all
    the results it will for a slow caller), or go on."""

    TYPE = "hold"
    job: int
    held: bool


@message
class Results(Message):
    """Server → console: results for ``indices`` (layout as :class:`TaskResult`); a run
    travels as ``start``/``count`` with ``indices`` empty. Read :attr:`answered`."""

    TYPE = "results"
    job: int
    indices: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    errors: list[list[Any]] = field(default_factory=list)
    output: str = ""
    partial: bool = False
    packed: bool = False
    start: int = 0
    count: int = 0
    payload: bytes = b""

    @property
    def answered(self) -> list[int] | range:
        """The argument indices answered, in the order of ``sizes`` (a range for a run)."""
        return range(self.start, self.start + self.count) if self.count else self.indices

    @staticmethod
    def layout(indices: list[int] | range) -> tuple[list[int], int, int]:
        """``indices`` as the fields ``indices``, ``start``, ``count`` carry them: a run
        ``range(a, b)`` as ``([], a, b - a)``, anything else as a list."""
        if type(indices) is range and indices.step == 1 and len(indices):
            return [], indices.start, len(indices)
        return list(indices), 0, 0

    @classmethod
    def of(cls, job: int, indices: list[int] | range, **fields: Any) -> Results:
        """Results for ``indices``: a run ``range(a, b)`` as ``start``/``count``."""
        listed, start, count = cls.layout(indices)
        return cls.make(job=job, indices=listed, start=start, count=count, **fields)


@message
class JobDone(Message):
    """Server → console: the job ended; ``state`` is done, failed, killed or cancelled."""

    TYPE = "job_done"
    job: int
    state: str
    done: int
    failed: int
    message: str = ""


@message
class JobNotice(Message):
    """Server → console: something the user should see while the job waits or runs."""

    TYPE = "job_notice"
    job: int
    message: str


@message
class JobCounters(Message):
    """Console → server: the counts a file job's tasks added up so far (shown in status)."""

    TYPE = "job_counters"
    job: int
    counters: dict


@message
class StatusRequest(Message):
    """Console → server: describe the cluster."""

    TYPE = "status"
    id: int


@message
class StatusReply(Message):
    """Server → console: the maps of ``protocol.status``' records (see README)."""

    TYPE = "status_reply"
    re: int
    nodes: list[dict] = field(metadata={"record": NodeStatus})
    jobs: list[dict] = field(metadata={"record": JobStatus})
    server: dict = field(default_factory=dict, metadata={"record": ServerStatus})


@message
class Kill(Message):
    """Console → server: stop a job's queued and running work."""

    TYPE = "kill"
    id: int
    job: int


@message
class KillCluster(Message):
    """Console → server: stop every node, then the server."""

    TYPE = "kill_cluster"
    id: int


@message
class Drain(Message):
    """Console → server: let a node finish its in-flight work and give it no more."""

    TYPE = "drain"
    id: int
    node: str


@message
class Undrain(Message):
    """Console → server: let a drained node take work again."""

    TYPE = "undrain"
    id: int
    node: str


@message
class Exclude(Message):
    """Console → server: put a node's host on the persistent exclusion list (no more work)."""

    TYPE = "exclude"
    id: int
    node: str


@message
class Include(Message):
    """Console → server: take a host off the exclusion list (its nodes get work again)."""

    TYPE = "include"
    id: int
    node: str


@message
class Attach(Message):
    """Console → server: receive a (detached) job's results; of a data or vertex job, its
    state and task output from byte ``since`` on."""

    TYPE = "attach"
    id: int
    job: int
    since: int = 0


@message
class Drive(Message):
    """Console → server: run a data or vertex job's driver on the server, detached; payload:
    its shipped files (``remap.bundle.pack_tree``), ``files`` the older way (name → text)."""

    TYPE = "drive"
    id: int
    kind: str
    name: str
    job: str
    files: dict = field(default_factory=dict)
    payload: bytes = b""


@message
class Resume(Message):
    """Console → server, after reconnecting: take back a job this console feeds; ``missing``
    are the runs ``[start, stop)`` of the ``sent`` arguments it has no outcome of (README)."""

    TYPE = "resume"
    id: int
    job: int
    sent: int
    missing: list[list[int]]
    done: int
    failed: int


@message
class Ok(Message):
    """Server → console: a request succeeded."""

    TYPE = "ok"
    re: int
    info: dict = field(default_factory=dict)
