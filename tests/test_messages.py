"""The message catalogue (protocol/messages.py): every message round-trips; malformed headers are refused.

Pure tests: no reactor, no sockets.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol import messages as m
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.status import JobStatus, NodeStatus, ServerStatus

README = Path(__file__).resolve().parent.parent / "protocol" / "README.md"
CATALOGUE = m.message_types()

NODE_STATUS = NodeStatus(
    id="n1",
    host="h",
    pid=9,
    cores=2,
    busy=1,
    tasks_in_flight=3,
    memory=1 << 30,
    load=0.5,
    group=None,
    draining=False,
    suspect=False,
    excluded=False,
    connected_for=2.0,
    tasks_done=7,
    data_dir="/data",
    data_id="t1",
    data_error=None,
)
JOB_STATUS = JobStatus(
    id=3,
    name="j",
    state="running",
    phase="receiving",
    mode="object",
    group=None,
    total=None,
    received=5,
    queued=1,
    running=2,
    done=2,
    failed=0,
    rate=1.5,
    elapsed=2.0,
    waiting="",
    detached=False,
    output=None,
    attached=True,
    message="",
    owner=None,
    weight=1.0,
    share=1.0,
    cores=2,
    max_cores=None,
    min_cores=0,
    counters={"map_records_in": 12},
)

#: one hand-written, non-default instance of every message: the table a reader checks against
EXAMPLES: dict[str, m.Message] = {
    "hello": m.Hello(version=m.PROTOCOL_VERSION, role="console", nonce=b"n" * 32, user="ada"),
    "challenge": m.Challenge(version=m.PROTOCOL_VERSION, nonce=b"s" * 32, proof=b"p" * 32),
    "auth": m.Auth(proof=b"q" * 32),
    "about": m.About(python="3.11", cloudpickle="3.1", max_frame=1 << 20),
    "welcome": m.Welcome(session="0123456789abcdef", max_frame=1 << 20, heartbeat=1.5),
    "error": m.Error(code="not-found", message="no job 7", re=12),
    "heartbeat": m.Heartbeat(load=0.75, busy=3),
    "node_info": m.NodeInfo(host="h", pid=42, cores=8, memory=1 << 34, group="gpu", load=1.25),
    "job_load": m.JobLoad(job=3, star=True, timeout=2.5, reduce=True, payload=b"\x80\x05fn"),
    "job_drop": m.JobDrop(job=3),
    "task": m.Task(task=9, job=3, sizes=[2, 0, 3], payload=b"aabbb"),
    "result": m.TaskResult(
        task=9,
        sizes=[1, 2],
        errors=[[1, "ValueError", "bad", "tb"]],
        elapsed=0.25,
        output="printed\n",
        partial=False,
        payload=b"xyy",
    ),
    "task_failed": m.TaskFailed(task=9, reason="timeout", at=2, message="killed after 5s"),
    "cancel": m.Cancel(job=3),
    "core_ready": m.CoreReady(pid=4242),
    "core_load": m.CoreLoad(job=3, star=True, reduce=True, payload=b"\x80\x05fn"),
    "core_drop": m.CoreDrop(job=3),
    "shutdown": m.Shutdown(reason="kill --cluster"),
    "goodbye": m.Goodbye(reason="stopping"),
    "submit": m.Submit(
        id=1,
        name="job",
        mode="stream",
        group="g",
        retries=1,
        timeout=3.0,
        on_error="continue",
        chunksize=10,
        priority=5,
        detach=True,
        star=True,
        total=100,
        wait_for_nodes=2.0,
        payload=b"\x80\x05fn",
    ),
    "submitted": m.Submitted(re=1, job=3, window=512),
    "args": m.Args(job=3, start=10, sizes=[3, 3], payload=b"abcdef"),
    "args_end": m.ArgsEnd(job=3, total=16),
    "grant": m.Grant(job=3, count=64),
    "group_limit": m.GroupLimit(job=3, max_bytes=65_262),
    "results": m.Results(
        job=3,
        indices=[4, 5],
        sizes=[1, 0],
        errors=[[1, "E", "m", ""]],
        output="o",
        partial=False,
        payload=b"r",
    ),
    "job_done": m.JobDone(job=3, state="done", done=16, failed=0, message="ok"),
    "job_notice": m.JobNotice(job=3, message="waiting for a node of group gpu"),
    "job_counters": m.JobCounters(job=3, counters={"map_records_in": 12, "blank_lines": 1}),
    "hold": m.Hold(job=3, held=True),
    "status": m.StatusRequest(id=2),
    "status_reply": m.StatusReply(
        re=2,
        nodes=[NODE_STATUS.to_wire()],
        jobs=[JOB_STATUS.to_wire()],
        server=ServerStatus(uptime=1.5, cores=2, cpu_seconds=0.2, excluded=["b"]).to_wire(),
    ),
    "kill": m.Kill(id=4, job=3),
    "kill_cluster": m.KillCluster(id=5),
    "drain": m.Drain(id=6, node="n1"),
    "undrain": m.Undrain(id=8, node="n1"),
    "exclude": m.Exclude(id=9, node="n1"),
    "include": m.Include(id=10, node="box1"),
    "attach": m.Attach(id=7, job=3),
    "drive": m.Drive(
        id=8, kind="vertex", name="pr", job='{"kind": "vertex"}', files={"pr.py": "x = 1"}
    ),
    "resume": m.Resume(id=8, job=3, sent=10, missing=[[2, 4], [7, 8]], done=6, failed=1),
    "ok": m.Ok(re=4, info={"job": 3, "state": "killed"}),
}


def header_of(msg: m.Message) -> dict[str, Any]:
    header, _ = m.encode(msg)
    return msgpack.unpackb(header, raw=False)


def fields_of(cls: type[m.Message]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "payload"]


def channel_of(type_name: str) -> str:
    """Where a message travels: a node's pipe to its cores, or the network."""
    return "pipe" if CATALOGUE[type_name].CHANNEL == "pipe" else "wire"


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_each_channel_takes_its_own_messages_only(type_name):
    """Core commands are refused on a network connection (as unknown, so a peer cannot drive a
    node's cores), and network messages on a core pipe; ``result`` travels both."""
    header, payload = m.encode(EXAMPLES[type_name])
    channel = CATALOGUE[type_name].CHANNEL
    for other in ("wire", "pipe"):
        if channel in (other, "both"):
            assert m.decode(header, payload, channel=other) == EXAMPLES[type_name]
        else:
            with pytest.raises(m.UnknownMessageType):
                m.decode(header, payload, channel=other)


def test_examples_cover_the_whole_catalogue():
    """The example table above names every registered message type (a new one must be added)."""
    assert set(EXAMPLES) == set(CATALOGUE)
    for type_name, msg in EXAMPLES.items():
        assert type(msg).TYPE == type_name


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_round_trip(type_name):
    """encode then decode gives back an equal message, payload included and untouched."""
    msg = EXAMPLES[type_name]
    header, payload = m.encode(msg)
    assert isinstance(header, bytes)
    assert payload == getattr(msg, "payload", b"")
    assert m.decode(header, payload, channel=channel_of(type_name)) == msg


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_header_is_a_map_of_t_and_the_fields(type_name):
    """The header holds "t" and every non-payload field by name, but those at their default
    (optional fields may be omitted); the payload never enters it."""
    msg = EXAMPLES[type_name]
    data = header_of(msg)
    assert data.pop("t") == type_name
    at_default = {
        f.name
        for f in fields_of(type(msg))
        if getattr(msg, f.name)
        == (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
    }
    assert set(data) == {f.name for f in fields_of(type(msg))} - at_default
    assert "payload" not in data


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_defaults_fill_missing_optional_fields(type_name):
    """A header carrying only the required fields decodes, with the documented defaults."""
    cls = CATALOGUE[type_name]
    full = header_of(EXAMPLES[type_name])
    minimal = {"t": type_name}
    for f in fields_of(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            minimal[f.name] = full[f.name]
    msg = m.decode(msgpack.packb(minimal, use_bin_type=True), b"", channel=channel_of(type_name))
    for f in fields_of(cls):
        if f.name not in minimal:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(msg, f.name) == default


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_missing_required_field_refused(type_name):
    """Dropping any required field is a RemoteProtocolError naming that field."""
    cls = CATALOGUE[type_name]
    required = [
        f.name
        for f in fields_of(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    full = header_of(EXAMPLES[type_name])
    for name in required:
        data = {k: v for k, v in full.items() if k != name}
        with pytest.raises(RemoteProtocolError, match=re.escape(repr(name))):
            m.decode(msgpack.packb(data, use_bin_type=True), b"", channel=channel_of(type_name))


#: values of every msgpack kind; for each field at least one of them must be the wrong type
_CANDIDATES: list[Any] = [5, 1.5, "text", b"bytes", True, None, [1.5], {"k": 1}]


def _wrong_value(annotation: Any) -> Any:
    """A msgpack value of a kind this annotation does not allow."""
    allowed = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    kinds = {typing.get_origin(a) or a for a in allowed}
    for value in _CANDIDATES:
        kind = type(value)
        if kind is type(None) and type(None) in kinds:
            continue
        if kind is int and (int in kinds or float in kinds):
            continue
        if kind in kinds:
            continue
        return value
    raise AssertionError(f"no wrong value for {annotation!r}")


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_wrong_field_type_refused(type_name):
    """Each field with a checkable type refuses a value of the wrong type."""
    cls = CATALOGUE[type_name]
    hints = typing.get_type_hints(cls)
    full = header_of(EXAMPLES[type_name])
    checked = 0
    for f in fields_of(cls):
        if hints[f.name] is Any:
            continue
        data = dict(full, **{f.name: _wrong_value(hints[f.name])})
        with pytest.raises(RemoteProtocolError, match=f"{type_name}.{f.name}"):
            m.decode(msgpack.packb(data, use_bin_type=True), b"", channel=channel_of(type_name))
        checked += 1
    assert checked == len(fields_of(cls))


@pytest.mark.parametrize(
    ("field_type", "good", "bad"),
    [
        (int, [0, -1, 2**63 - 1], [True, 1.0, "1", None]),
        (float, [0.5, 3, -2], [True, "1.0", None]),
        (bool, [True, False], [0, 1, "true", None]),
        (str, ["", "x"], [b"x", 1, None]),
        (bytes, [b"", b"x"], ["x", 1, None]),
        (list[int], [[], [1, 2]], [[1.0], [True], ["1"], (1,), None]),
        (int | None, [None, 3], [1.5, "3"]),
        (dict, [{}, {"a": 1}], [[], None]),
    ],
)
def test_field_checkers_are_strict(field_type, good, bad):
    """bool is not an int, int is a float, lists are checked element by element."""
    check = m._checker(field_type)
    for value in good:
        assert check(value), value
    for value in bad:
        assert not check(value), value


def test_unknown_field_refused():
    """A header with a field the message does not have is refused (no silent extras)."""
    data = dict(header_of(EXAMPLES["grant"]), extra=1)
    with pytest.raises(RemoteProtocolError, match="unknown field"):
        m.decode(msgpack.packb(data), b"")


def test_payload_on_a_payloadless_message_refused():
    """Only messages with a payload field may carry payload bytes."""
    header, _ = m.encode(EXAMPLES["grant"])
    with pytest.raises(RemoteProtocolError, match="carries no payload"):
        m.decode(header, b"unexpected")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x81\xa1t", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb("t"), "not a map"),
        (msgpack.packb({"x": 1}), "no message type"),
        (msgpack.packb({"t": 5}), "no message type"),
        (msgpack.packb({1: "x"}, use_bin_type=True), "not valid msgpack"),
        (msgpack.packb({"t": "grant", "job": 1, "count": 1}) + b"\x00", "not valid msgpack"),
        (b"\x81\xa1t\xa2\xff\xfe", "not valid msgpack"),
    ],
)
def test_malformed_headers(header, match):
    """Garbage, non-maps, missing/odd type, int keys, trailing bytes, bad UTF-8: one error type."""
    with pytest.raises(RemoteProtocolError, match=match):
        m.decode(header, b"")


def test_unknown_type_carries_the_request_id():
    """An unknown type raises UnknownMessageType with the request id, so the peer can be answered."""
    with pytest.raises(m.UnknownMessageType) as info:
        m.decode(msgpack.packb({"t": "from_the_future", "id": 17}), b"")
    assert info.value.re == 17
    assert info.value.code == "unknown-message"
    assert isinstance(info.value, RemoteProtocolError)
    with pytest.raises(m.UnknownMessageType) as info:
        m.decode(msgpack.packb({"t": "x" * 1000, "id": "not-an-int"}), b"")
    assert info.value.re is None
    assert len(info.value.type_name) == 64


@pytest.mark.parametrize("type_name", sorted(CATALOGUE))
def test_preauth_flag_gates_decoding(type_name):
    """Before authentication only the handshake messages and error decode; everything else is refused."""
    msg = EXAMPLES[type_name]
    header, payload = m.encode(msg)
    if type_name in ("hello", "challenge", "auth", "about", "welcome", "error"):
        assert type(msg).PREAUTH
        assert m.decode(header, payload, preauth=True, channel=channel_of(type_name)) == msg
    else:
        assert not type(msg).PREAUTH
        with pytest.raises(RemoteProtocolError, match="not allowed before authentication"):
            m.decode(header, payload, preauth=True, channel=channel_of(type_name))


def test_encode_refuses_unregistered_and_unencodable():
    """Encoding a foreign object or a value msgpack cannot carry is a LocalProtocolError."""

    class NotAMessage(m.Message):
        TYPE = "nope"

    with pytest.raises(LocalProtocolError):
        m.encode(NotAMessage())
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        m.encode(m.Ok(re=1, info={"x": object()}))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        m.encode(m.Grant(job=1, count=2**70))


def test_messages_are_frozen():
    """Messages are immutable values (safe to queue and to share)."""
    msg = EXAMPLES["grant"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.count = 3  # type: ignore[misc]


def test_registering_a_type_twice_fails():
    """Two messages cannot share a wire name."""
    with pytest.raises(TypeError, match="registered twice"):

        @m.message
        class Duplicate(m.Message):
            TYPE = "grant"
            job: int


def test_readme_documents_every_message_and_field():
    """protocol/README.md names every message type and each of its fields (the spec cannot drift)."""
    text = README.read_text(encoding="utf-8")
    for type_name, cls in CATALOGUE.items():
        section = re.search(
            rf"^#### `{re.escape(type_name)}`.*?(?=^#### |^## |\Z)", text, re.M | re.S
        )
        assert section, f"README has no '#### `{type_name}`' section"
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in section.group(0), (
                f"README section {type_name} lacks field {f.name}"
            )


def test_readme_frame_example_is_exact():
    """The byte-level example in protocol/README.md is what this implementation puts on the wire."""
    from protocol.framing import encode_frame

    header, payload = m.encode(m.Grant(job=3, count=64))
    wire = b"".join(bytes(p) for p in encode_frame(header, payload))
    text = README.read_text(encoding="utf-8")
    assert "(29 bytes on the wire)" in text and len(wire) == 29
    groups = wire[:4].hex(" "), wire[4:8].hex(" "), wire[8:].hex(" ")
    assert "  ".join(groups) in text


def test_contiguous_results_travel_as_a_run_and_gaps_as_a_list():
    """200,000 answered indices cost two integers in the header, not a list of them; a batch
    with gaps (a retry, a requeued argument) still lists its indices."""
    run = m.Results.of(7, range(100, 200_100), sizes=[1] * 200_000)
    header, _ = m.encode(run)
    assert "indices" not in msgpack.unpackb(header) or msgpack.unpackb(header)["indices"] == []
    assert len(header) < 200_000 + 100  # the sizes, one byte each, and little more
    back = m.decode(header, b"")
    assert back.answered == range(100, 200_100) and back.indices == []
    gaps = m.decode(*m.encode(m.Results.of(7, [3, 5, 6], sizes=[1, 1, 1])))
    assert (gaps.indices, gaps.count, list(gaps.answered)) == ([3, 5, 6], 0, [3, 5, 6])
    assert m.Results.of(7, range(0), sizes=[]).answered == []


@pytest.mark.parametrize(
    "sizes", [[True], ["3"], [3.0], [None], [[3]], [3, True], [True, 3], [1, 2, "3"]]
)
def test_a_list_of_ints_of_any_length_refuses_any_other_item(sizes):
    """``sizes`` of one item (a single call's) is checked without a set, longer ones with one:
    either way an item that is not exactly an int (a bool neither) is refused."""
    header = msgpack.packb({"t": "args", "job": 1, "start": 0, "sizes": sizes})
    with pytest.raises(RemoteProtocolError, match="args.sizes: bad value"):
        m.decode(header, b"abc")
    ok = msgpack.packb({"t": "args", "job": 1, "start": 0, "sizes": [3]})
    assert m.decode(ok, b"abc").sizes == [3]


# --------------------------------------------------------------------------- header shapes


@pytest.fixture
def no_shapes_learned():
    """Every message type's learned header shapes emptied for the test and put back after:
    the tables are the process's, and tests run before this one in any order (pytest-randomly)
    may have filled a type's ``SHAPES`` slots with other key orders (the fuzz tests do)."""
    tables = {id(known[2]): known[2] for per in m._CHANNELS.values() for known in per.values()}
    saved = {key: dict(table) for key, table in tables.items()}
    for table in tables.values():
        table.clear()
    yield
    for key, table in tables.items():
        table.clear()
        table.update(saved[key])


def test_a_full_shape_table_is_what_the_shape_test_must_not_depend_on(no_shapes_learned):
    """A type whose ``SHAPES`` slots other key orders took (as earlier tests may leave them)
    still decodes through the general decoder and learns nothing more: the shape test below
    empties the tables first, or it fails when run after such tests."""
    import itertools

    fields = {"job": 7, "sizes": [1], "output": "o", "start": 2, "count": 1}
    for order in itertools.islice(itertools.permutations(fields), m.SHAPES):
        m.decode(msgpack.packb({"t": "results", **{k: fields[k] for k in order}}), b"x")
    header, payload = m.encode(m.Results.of(3, range(5, 6), sizes=[2], payload=b"ab"))
    assert m.decode(header, payload).answered == range(5, 6)
    assert tuple(msgpack.unpackb(header))[1:] not in m._CHANNELS["wire"]["results"][2]


def test_a_header_shape_seen_before_decodes_as_the_general_decoder_does(
    no_shapes_learned,
) -> None:
    """Once a header of some keys decoded, maps of exactly those keys take a decoder of their
    own (no look-up per absent field): every message of the catalogue decodes the same the
    second time, and a value that fails its check there gets the general decoder's error."""
    for msg in EXAMPLES.values():
        header, payload = m.encode(msg)
        channel = "pipe" if msg.CHANNEL == "pipe" else "wire"
        for _ in range(2):
            assert m.decode(header, payload, channel=channel, preauth=msg.PREAUTH) == msg
        shapes = m._CHANNELS[channel][msg.TYPE][2]
        assert tuple(msgpack.unpackb(header))[1:] in shapes, msg.TYPE
    header, payload = m.encode(m.Results.of(3, range(5, 6), sizes=[2], payload=b"ab"))
    assert m.decode(header, payload).answered == range(5, 6)
    bad = {"t": "results", "job": 3, "sizes": ["2"], "start": 5, "count": 1}
    assert tuple(bad)[1:] == tuple(msgpack.unpackb(header))[1:]
    with pytest.raises(RemoteProtocolError, match=r"results\.sizes: bad value of type list"):
        m.decode(msgpack.packb(bad), payload)
    grant = m.encode(m.Grant(job=1, count=2))[0]
    assert m.decode(grant, b"") == m.decode(grant, b"") == m.Grant(job=1, count=2)
    with pytest.raises(RemoteProtocolError, match="grant carries no payload"):
        m.decode(grant, b"x")


def test_header_shapes_learned_are_bounded(no_shapes_learned) -> None:
    """A peer may order a header's keys any way it likes: each order decodes, and a message
    type learns at most ``SHAPES`` of them (the rest take the general decoder)."""
    import itertools

    fields = {"job": 7, "sizes": [1], "output": "o", "start": 2, "count": 1}
    for order in itertools.permutations(fields):
        data = {"t": "results", **{k: fields[k] for k in order}}
        msg = m.decode(msgpack.packb(data), b"x")
        assert (msg.job, msg.sizes, msg.output, msg.answered) == (7, [1], "o", range(2, 3))
    assert len(m._CHANNELS["wire"]["results"][2]) <= m.SHAPES


# --------------------------------------------------------------------------- protocol version

#: the catalogue that PROTOCOL_VERSION names: change both together, never one alone
PINNED = (5, "04cceede1171e351")


def test_protocol_version_is_bumped_with_the_catalogue():
    """Any change to the catalogue (a message, a field, its type or default, a status record, an
    enumeration, the frame constants) changes the fingerprint: the version must move with it,
    so peers of different catalogues refuse each other at the hello, not mid-job."""
    now = (m.PROTOCOL_VERSION, m.catalogue_fingerprint())
    assert now == PINNED, (
        f"the message catalogue changed: bump PROTOCOL_VERSION in protocol/messages.py and "
        f"update PINNED in tests/test_messages.py to (NEW_VERSION, {now[1]!r}) "
        f"(pinned {PINNED}, now {now})"
    )


def test_catalogue_fingerprint_sees_a_new_field(monkeypatch):
    """Adding a field to a message (as ``args_end.id`` was) changes the fingerprint; the
    description is sorted plain data, so it is the same in every process."""
    description = m.catalogue_description()
    assert list(description["messages"]) == sorted(CATALOGUE)
    assert ["id", "int", "0"] in description["messages"]["args_end"]["fields"]
    assert description["frame"]["prefix"] == ">II"
    before = m.catalogue_fingerprint()

    @dataclasses.dataclass(frozen=True)
    class LaterArgsEnd(m.Message):
        TYPE = "args_end"
        job: int
        total: int
        id: int = 0
        extra: int = 0

    monkeypatch.setitem(m._REGISTRY, "args_end", LaterArgsEnd)
    assert m.catalogue_fingerprint() != before
