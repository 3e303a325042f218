"""Framing (protocol/framing.py): bytes in, frames out, in any split, with hard size limits.

Pure tests: no reactor, no sockets.
"""

from __future__ import annotations

import struct

import pytest

from protocol.errors import FrameTooLarge, RemapError, RemoteProtocolError
from protocol.framing import (
    DEFAULT_MAX_FRAME,
    MAX_HEADER,
    PREAUTH_MAX_FRAME,
    PREFIX_SIZE,
    Frame,
    FrameDecoder,
    encode_frame,
)


def frame_bytes(header: bytes, payload: bytes = b"") -> bytes:
    return b"".join(bytes(part) for part in encode_frame(header, payload))


#: frames with every shape that matters: empty header, empty payload, both empty,
#: payload bytes that look like length prefixes, a payload that is all zero bytes
SAMPLES: list[tuple[bytes, bytes]] = [
    (b"\x81\xa1t\xa4ping", b""),
    (b"", b""),
    (b"h", b"\x00\x00\x00\x04\x00\x00\x00\x00"),
    (b"", b"payload only"),
    (b"\x00" * 7, b"\xff" * 300),
    (b"head", bytes(range(256))),
]
STREAM = b"".join(frame_bytes(h, p) for h, p in SAMPLES)
EXPECTED = [Frame(h, p) for h, p in SAMPLES]


def test_frame_layout_is_length_then_header_length_then_header_then_payload():
    """A frame is u32be(4 + hlen + plen) | u32be(hlen) | header | payload, nothing else."""
    data = frame_bytes(b"HDR", b"payload!")
    assert data[:4] == struct.pack(">I", 4 + 3 + 8)
    assert data[4:8] == struct.pack(">I", 3)
    assert data[8:11] == b"HDR"
    assert data[11:] == b"payload!"
    assert PREFIX_SIZE == 8


def test_encode_frame_does_not_copy_the_payload():
    """The payload buffer is handed on as-is (a large payload is never copied by framing)."""
    payload = memoryview(b"x" * 100_000)
    parts = encode_frame(b"h", payload)
    assert parts[-1] is payload
    assert encode_frame(b"h", b"") == [struct.pack(">II", 5, 1), b"h"]


def test_whole_stream_in_one_feed():
    """Several frames in one read come out in order, each with its own header and payload."""
    decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
    assert decoder.feed(STREAM) == EXPECTED
    assert decoder.buffered == 0


def test_every_two_way_split_point():
    """Wherever the stream is cut in two, the same frames come out, none early, none twice."""
    boundaries = []
    offset = 0
    for h, p in SAMPLES:
        offset += len(frame_bytes(h, p))
        boundaries.append(offset)
    for split in range(len(STREAM) + 1):
        decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
        first = decoder.feed(STREAM[:split])
        # a frame appears only once its last byte has arrived
        assert len(first) == sum(1 for b in boundaries if b <= split), split
        second = decoder.feed(STREAM[split:])
        assert first + second == EXPECTED, split
        assert decoder.buffered == 0, split


def test_byte_at_a_time():
    """Feeding one byte per read yields exactly the same frames."""
    decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
    out: list[Frame] = []
    for i in range(len(STREAM)):
        out += decoder.feed(STREAM[i : i + 1])
        assert decoder.buffered <= len(STREAM)
    assert out == EXPECTED


def test_every_three_way_split_of_two_frames():
    """All pairs of cut points over two adjacent frames (covers cuts inside both prefixes)."""
    data = frame_bytes(b"ab", b"cdef") + frame_bytes(b"", b"g")
    expected = [Frame(b"ab", b"cdef"), Frame(b"", b"g")]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            decoder = FrameDecoder()
            out = decoder.feed(data[:i]) + decoder.feed(data[i:j]) + decoder.feed(data[j:])
            assert out == expected, (i, j)


def test_next_frame_hands_out_one_frame_at_a_time():
    """next_frame returns frames one by one and None when it needs more bytes."""
    decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
    decoder.add(STREAM + STREAM[:5])
    for expected in EXPECTED:
        assert decoder.next_frame() == expected
    assert decoder.next_frame() is None
    assert decoder.buffered == 5


def test_limit_can_change_between_frames_of_one_read():
    """A big frame right behind a small one is judged by the limit set after the small one."""
    data = frame_bytes(b"small") + frame_bytes(b"big", b"x" * 20_000)
    decoder = FrameDecoder(max_frame=PREAUTH_MAX_FRAME)
    decoder.add(data)
    assert decoder.next_frame() == Frame(b"small", b"")
    decoder.max_frame = DEFAULT_MAX_FRAME
    assert decoder.next_frame() == Frame(b"big", b"x" * 20_000)


def test_large_payload_in_chunks():
    """A 1 MiB payload arriving in 64 KiB reads comes out intact, once."""
    payload = bytes(range(256)) * 4096
    data = frame_bytes(b"h", payload)
    decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
    out: list[Frame] = []
    for i in range(0, len(data), 65536):
        out += decoder.feed(data[i : i + 65536])
    assert out == [Frame(b"h", payload)]
    assert decoder.buffered == 0


def test_limit_is_inclusive():
    """A frame exactly at the limit passes; one byte more is refused."""
    limit = 64
    at_limit = frame_bytes(b"h", b"p" * (limit - 4 - 1))
    assert struct.unpack(">I", at_limit[:4])[0] == limit
    assert FrameDecoder(limit).feed(at_limit) == [Frame(b"h", b"p" * (limit - 5))]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(limit).feed(frame_bytes(b"h", b"p" * (limit - 4)))


@pytest.mark.parametrize("length", [PREAUTH_MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_oversized_frame_refused_from_its_prefix_alone(length):
    """An oversized length is refused as soon as its 4 bytes arrive, before any body is buffered."""
    decoder = FrameDecoder()
    assert decoder.max_frame == PREAUTH_MAX_FRAME
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(struct.pack(">I", length))
    assert str(length) in str(info.value)
    assert info.value.code == "frame-too-large"


def test_oversized_frame_after_good_frames_in_batch_feed():
    """feed() raises on the bad frame; next_frame() still hands out the good ones before it."""
    data = frame_bytes(b"ok") + struct.pack(">I", 2**31)
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(data)
    decoder = FrameDecoder()
    decoder.add(data)
    assert decoder.next_frame() == Frame(b"ok", b"")
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_too_short_for_header_length_field(length):
    """A frame must at least hold its header-length field."""
    with pytest.raises(RemoteProtocolError, match="shorter"):
        FrameDecoder().feed(struct.pack(">I", length) + b"\x00" * 8)


def test_header_length_longer_than_frame():
    """A header length that runs past the end of its frame is refused."""
    with pytest.raises(RemoteProtocolError, match="does not fit"):
        FrameDecoder().feed(struct.pack(">II", 6, 3) + b"ab")


def test_header_longer_than_max_header_refused_even_after_auth():
    """Control headers have their own cap (MAX_HEADER) however large frames may be."""
    hlen = MAX_HEADER + 1
    data = struct.pack(">II", 4 + hlen, hlen) + b"\x00" * hlen
    with pytest.raises(RemoteProtocolError, match="header length"):
        FrameDecoder(max_frame=DEFAULT_MAX_FRAME).feed(data)


def test_errors_are_library_errors():
    """Every framing error is a RemoteProtocolError, so callers catch one family."""
    assert issubclass(FrameTooLarge, RemoteProtocolError)
    assert issubclass(RemoteProtocolError, RemapError)


def test_partial_prefix_waits():
    """Fewer than 4 bytes is not an error, just not a frame yet."""
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.buffered == 2
    assert decoder.feed(b"\x00\x05\x00\x00\x00\x01h") == [Frame(b"h", b"")]


def test_large_frame_then_small_frame_in_the_same_read() -> None:
    """A large frame gathered over many reads, whose last read also holds the start and end of
    the next frame, yields both frames intact (the large payload is not corrupted by the view)."""
    from protocol.framing import LARGE_FRAME

    big = bytes(range(256)) * (LARGE_FRAME // 256 + 7)
    stream = b"".join(encode_frame(b"\x81\xa1t\xa1a", big)) + b"".join(
        encode_frame(b"\x80", b"tail")
    )
    decoder = FrameDecoder(max_frame=len(stream))
    frames = []
    step = 10_000
    for i in range(0, len(stream) - 30, step):
        frames += decoder.feed(stream[i : min(i + step, len(stream) - 30)])
    frames += decoder.feed(stream[len(stream) - 30 :])
    assert [bytes(f.payload) for f in frames] == [big, b"tail"]
    assert decoder.buffered == 0


def test_large_frame_with_a_lying_header_length_is_refused() -> None:
    """A large frame whose header length exceeds the frame is refused once it is complete."""
    from protocol.framing import LARGE_FRAME

    length = LARGE_FRAME + 100
    frame = struct.pack(">II", length, length + 1) + b"\0" * (length - 4)
    decoder = FrameDecoder(max_frame=length)
    decoder.feed(frame[:1000])
    with pytest.raises(RemoteProtocolError):
        decoder.feed(frame[1000:])
