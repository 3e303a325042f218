"""Length-prefixed framing, sans-IO: bytes in, frames out.

A frame is ``length:u32be | hlen:u32be | header[hlen] | payload[length - 4 - hlen]``.
The header is a small msgpack map (control data); the payload is an opaque blob
(pickles, which may contain any byte, so the format never relies on a delimiter).
"""

from __future__ import annotations

import mmap
import struct
import threading
from typing import NamedTuple

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
#: bytes of the MAC at the head of a frame's header once its sender proved the secret
MAC_SIZE = 32


class Frame(NamedTuple):
    """One decoded frame (a tuple: built per frame by ``tuple.__new__``, a C call)."""

    header: bytes
    payload: bytes | memoryview  # a view into the received bytes for large frames


_new_frame = tuple.__new__


def frame_length(header: bytes, payload: bytes | memoryview = b"") -> int:
    """The frame's ``length`` field, which a receiver holds against its limit (header and
    ``hlen`` included)."""
    return 4 + len(header) + len(payload)


def encode_frame(header: bytes, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """Return the frame as a list of buffers, so a large payload is never copied."""
    length = 4 + len(header) + len(payload)
    parts: list[bytes | memoryview] = [_PREFIX.pack(length, len(header)), header]
    if payload:
        parts.append(payload)
    return parts


def small_frame(header: bytes, payload: bytes | memoryview = b"") -> bytes:
    """The frame as one bytes object: for a small message written in one piece."""
    return _PREFIX.pack(4 + len(header) + len(payload), len(header)) + header + payload


#: bytes asked per read outside large frames (a small frame comes whole; below malloc's mmap
#: threshold, so a read costs no mmap)
READ_SIZE = 64 * 1024
#: a payload up to this size is copied into one buffer with its frame (cheaper than writing parts)
SMALL_PAYLOAD = 64 * 1024


def frame_parts(header: bytes, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """The frame as buffers to write: one for a small payload, else :func:`encode_frame`'s."""
    if len(payload) <= SMALL_PAYLOAD:
        return [small_frame(header, payload)]
    return encode_frame(header, payload)


def unsent(parts: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What is left of ``parts`` after the first ``sent`` bytes were written (views, no copy)."""
    rest: list[bytes | memoryview] = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        elif sent:
            rest.append(memoryview(part)[sent:])
            sent = 0
        else:
            rest.append(part)
    return rest


#: frames at least this long are received into a buffer of their own, allocated once
LARGE_FRAME = 256 * 1024
#: frames at least this long get anonymous memory of their own (see :func:`frame_buffer`)
HUGE_FRAME = 32 * 1024 * 1024
#: bytes of large-frame buffers a process keeps for reuse (see :class:`BufferPool`)
POOL_BYTES = 16 * 1024 * 1024


class BufferPool:
    """Large-frame buffers, reused once no view of them is left.

    A fresh ``bytearray`` of a MiB is zero-filled and may fault in 256 new pages, all then
    overwritten by the frame. The pool refers to at most ``limit`` bytes; past it a frame gets
    a buffer of its own. A frame is handed out only once all of it arrived, so nothing of an
    earlier frame is ever seen in a later one.
    """

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()  # decoders on several threads (a client's and a test's)
        #: for tests and benches
        self.reused = 0
        self.made = 0

    @staticmethod
    def _free(buf: bytearray) -> bool:
        """``buf`` has no view left (else it cannot resize; the byte :func:`_new` keeps spare
        makes the growth free)."""
        try:
            buf.append(0)
        except BufferError:
            return False
        del buf[-1]
        return True

    @staticmethod
    def _new(size: int) -> bytearray:
        buf = bytearray(size + 1)
        del buf[-1]  # the allocation keeps the spare byte: see _free
        return buf

    def take(self, size: int) -> memoryview:
        """A writable buffer of exactly ``size`` bytes (contents undefined)."""
        with self._lock:
            buffers = self._buffers
            for buf in buffers:
                if size <= len(buf) <= 2 * size and self._free(buf):
                    self.reused += 1
                    return memoryview(buf)[:size]
            self.made += 1
            new = self._new(size)
            total = sum(map(len, buffers)) + size
            if total > self.limit:  # make room: forget free buffers, oldest first
                for buf in list(buffers):
                    if total <= self.limit:
                        break
                    if self._free(buf):
                        buffers.remove(buf)
                        total -= len(buf)
            if total <= self.limit:
                buffers.append(new)
            return memoryview(new)

    def held(self) -> int:
        """Bytes the pool refers to (in use or free)."""
        return sum(map(len, self._buffers))


#: this process's pool of large-frame buffers
POOL = BufferPool()


def frame_buffer(size: int) -> memoryview:
    """A writable buffer for a large frame: from :data:`POOL` (resident memory reused, where
    fresh pages cost a fault each), or from :data:`HUGE_FRAME` on anonymous memory, whose
    pages are only taken as the frame arrives."""
    if size < HUGE_FRAME:
        return POOL.take(size)
    return memoryview(mmap.mmap(-1, size))


class FrameDecoder:
    """Accumulates bytes in any split and yields complete frames.

    The size limit is checked as soon as a length prefix is readable, so an oversized frame
    costs the receiver 4 bytes. :meth:`next_frame` hands out one frame at a time so the owner
    can raise :attr:`max_frame` between two frames of one read (after the handshake).

    A large frame is received into one buffer of its size; a reader that can read into memory
    asks :meth:`read_buffer` where and reports with :meth:`wrote`: no copy, the payload a view.
    """

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed byte in _buf
        self._large: memoryview | None = None  # the large frame being received, in place
        self._filled = 0  # bytes of it received
        #: the full size of the large frame being received (prefix included), or 0; an
        #: attribute, not a property, as a reader asks it on every read
        self.gathering = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos + (self._filled if self._large is not None else 0)

    def read_buffer(self) -> memoryview | None:
        """Where the next bytes may be read directly; None: read as usual and :meth:`add`."""
        if not self.gathering or self._filled >= self.gathering:
            return None
        return self._frame()[self._filled :]

    def wrote(self, n: int) -> None:
        """``n`` bytes were read into :meth:`read_buffer`'s view."""
        self._filled += n

    def _frame(self) -> memoryview:
        """The large frame's buffer, allocated on the first bytes after its prefix (a peer
        paused on that prefix pins nothing more)."""
        if self._large is None:
            self._large = frame_buffer(self.gathering)
            self._large[: len(self._buf)] = self._buf
            self._filled = len(self._buf)
            self._buf = bytearray()
        return self._large

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes; frames come out of :meth:`next_frame`."""
        if self.gathering and self._filled < self.gathering:
            large = self._frame()
            n = min(len(data), self.gathering - self._filled)
            large[self._filled : self._filled + n] = memoryview(data)[:n]
            self._filled += n
            if n == len(data):
                return
            data = memoryview(data)[n:]  # the start of the next frame
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def _large_frame(self) -> Frame:
        view, need = self._large, self.gathering
        assert view is not None
        self._large, self._filled, self.gathering = None, 0, 0
        (hlen,) = _U32.unpack_from(view, 4)
        if hlen > need - PREFIX_SIZE or hlen > MAX_HEADER:
            raise RemoteProtocolError(f"header length {hlen} does not fit in frame of {need - 4}")
        # the payload stays a view into the frame's own buffer: never copied
        view = view.toreadonly()
        header = bytes(view[PREFIX_SIZE : PREFIX_SIZE + hlen])
        return _new_frame(Frame, (header, view[PREFIX_SIZE + hlen : need]))

    def whole(self, data: bytes) -> Frame | None:
        """``data`` as one frame, when it is exactly one whole small frame within the limits
        and nothing is buffered: no copy through the buffer. None: :meth:`add` it."""
        if self.gathering or self._pos != len(self._buf) or len(data) < PREFIX_SIZE:
            return None
        length, hlen = _PREFIX.unpack_from(data)
        if length + 4 != len(data) or length > self.max_frame or hlen > length - 4:
            return None
        if hlen > MAX_HEADER or length >= LARGE_FRAME:
            return None
        return _new_frame(
            Frame, (data[PREFIX_SIZE : PREFIX_SIZE + hlen], data[PREFIX_SIZE + hlen :])
        )

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive. Raises RemoteProtocolError."""
        if self.gathering:
            if self._large is None or self._filled < self.gathering:
                return None
            return self._large_frame()
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 4:  # compacted here, not by a call: this ends every read
            if pos:
                del buf[:pos]
                self._pos = 0
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
            if pos:
                del buf[:pos]
                self._pos = 0
            if length >= LARGE_FRAME:
                self.gathering = 4 + length
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
        return _new_frame(Frame, (header, payload))

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add bytes; return every frame now complete. Raises RemoteProtocolError."""
        self.add(data)
        return self.frames()

    def frames(self) -> list[Frame]:
        """Every frame complete now. Raises RemoteProtocolError."""
        frames: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames
