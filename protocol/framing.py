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
    payload: bytes


def encode_frame(header: bytes, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """Return the frame as a list of buffers, so a large payload is never copied."""
    length = 4 + len(header) + len(payload)
    parts: list[bytes | memoryview] = [_PREFIX.pack(length, len(header)), header]
    if payload:
        parts.append(payload)
    return parts


class FrameDecoder:
    """Accumulates bytes in any split and yields complete frames.

    The size limit is checked as soon as a length prefix is readable, before any
    of the body is buffered, so an oversized frame costs the receiver 4 bytes.
    """

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete. Raises RemoteProtocolError."""
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        frames: list[Frame] = []
        try:
            while end - pos >= 4:
                (length,) = _U32.unpack_from(buf, pos)
                if length > self.max_frame:
                    raise FrameTooLarge(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"
                    )
                if length < 4:
                    raise RemoteProtocolError(f"frame length {length} is shorter than its header length field")
                if end - pos - 4 < length:
                    break
                (hlen,) = _U32.unpack_from(buf, pos + 4)
                if hlen > length - 4 or hlen > MAX_HEADER:
                    raise RemoteProtocolError(f"header length {hlen} does not fit in frame of {length}")
                start = pos + PREFIX_SIZE
                header = bytes(buf[start : start + hlen])
                payload = bytes(buf[start + hlen : pos + 4 + length])
                pos += 4 + length
                frames.append(Frame(header, payload))
        finally:
            if pos:
                del buf[:pos]
        return frames
