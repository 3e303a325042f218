"""Length-prefixed framing, sans-IO: bytes in, frames out.

A frame is ``length:u32be | hlen:u32be | header[hlen] | payload[length - 4 - hlen]``.
The header is a small msgpack map (control data); the payload is an opaque blob
(pickles, which may contain any byte, so the format never relies on a delimiter).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FrameTooLarge, RemoteProtocolError

_U32 = struct.Struct(">I")
_PREFIX = struct.Struct(">II")
PREFIX_SIZE = _PREFIX.size

#: limit before the peer is authenticated: enough for the handshake messages only
PREAUTH_MAX_FRAME = 8 * 1024
#: default limit once both sides are authenticated
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
#: largest header accepted, even after authentication
MAX_HEADER = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: raw msgpack header bytes and the opaque payload."""

    header: bytes
    payload: bytes | memoryview  # a view into the received bytes for large frames


def encode_frame(header: bytes, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """Return the frame as a list of buffers, so a large payload is never copied."""
    length = 4 + len(header) + len(payload)
    parts: list[bytes | memoryview] = [_PREFIX.pack(length, len(header)), header]
    if payload:
        parts.append(payload)
    return parts


def frame_length(prefix: bytes) -> tuple[int, int]:
    """``(length, hlen)`` from a frame's prefix, for readers that read the body themselves."""
    return _PREFIX.unpack(prefix)


#: frames at least this long are gathered read by read and joined once
LARGE_FRAME = 256 * 1024


class FrameDecoder:
    """Accumulates bytes in any split and yields complete frames.

    The size limit is checked as soon as a length prefix is readable, before any
    of the body is buffered, so an oversized frame costs the receiver 4 bytes.

    :meth:`next_frame` hands out one frame at a time so the owner can change
    :attr:`max_frame` between two frames that arrived in the same read (the limit
    grows once the handshake completes); :meth:`feed` is the batch form.
    """

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed byte in _buf
        # A large frame is gathered as a list of reads and joined once when complete: growing
        # one bytearray read by read, then copying the payload out, costs ~20× more per MiB.
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._parts_need = 0  # bytes the large frame needs in total (prefix included)
        self._ready: bytes | None = None  # a large frame, joined, not yet handed out

    @property
    def gathering(self) -> int:
        """The full size of the large frame being received (prefix included), or 0: what the
        receiver must be ready to hold once it completes (small frames are not counted)."""
        return self._parts_need

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos + self._parts_len

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes; frames come out of :meth:`next_frame`."""
        if self._parts_need:
            self._parts.append(bytes(data))
            self._parts_len += len(data)
            if self._parts_len >= self._parts_need:
                self._finish_large()
            return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def _finish_large(self) -> None:
        self._ready = b"".join(self._parts)
        self._parts, self._parts_len = [], 0

    def _large_frame(self, joined: bytes) -> Frame:
        need, self._parts_need = self._parts_need, 0
        (hlen,) = _U32.unpack_from(joined, 4)
        view = memoryview(joined)
        self._buf = bytearray(view[need:])
        self._pos = 0
        if hlen > need - PREFIX_SIZE or hlen > MAX_HEADER:
            raise RemoteProtocolError(f"header length {hlen} does not fit in frame of {need - 4}")
        # the payload stays a view into the joined frame: no second copy of a large payload
        return Frame(bytes(view[PREFIX_SIZE : PREFIX_SIZE + hlen]), view[PREFIX_SIZE + hlen : need])

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive. Raises RemoteProtocolError."""
        if self._ready is not None:
            joined, self._ready = self._ready, None
            return self._large_frame(joined)
        if self._parts_need:
            return None
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 4:
            self._compact()
            return None
        (length,) = _U32.unpack_from(buf, pos)
        if length > self.max_frame:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"
            )
        if length < 4:
            raise RemoteProtocolError(
                f"frame length {length} is shorter than its header length field"
            )
        if available - 4 < length:
            self._compact()
            if length >= LARGE_FRAME:
                self._parts = [bytes(buf)]
                self._parts_len = len(buf)
                self._parts_need = 4 + length
                self._buf = bytearray()
            return None
        (hlen,) = _U32.unpack_from(buf, pos + 4)
        if hlen > length - 4 or hlen > MAX_HEADER:
            raise RemoteProtocolError(f"header length {hlen} does not fit in frame of {length}")
        start = pos + PREFIX_SIZE
        end = pos + 4 + length
        with memoryview(buf) as view:  # one copy per part, and the view is released at once
            header = bytes(view[start : start + hlen])
            payload = bytes(view[start + hlen : end])
        self._pos = end
        return Frame(header, payload)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add bytes; return every frame now complete. Raises RemoteProtocolError."""
        self.add(data)
        frames: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
