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


class Frame(NamedTuple):
    """One decoded frame: raw msgpack header bytes and the opaque payload.

    A tuple: the decoder builds one per frame with ``tuple.__new__`` (a C call; a frozen
    dataclass's ``__init__`` was a Python call setting each field through ``object.__setattr__``).
    """

    header: bytes
    payload: bytes | memoryview  # a view into the received bytes for large frames


_new_frame = tuple.__new__


def frame_length(header: bytes, payload: bytes | memoryview = b"") -> int:
    """The frame's ``length`` field: what a receiver holds against its limit (the frame is
    refused when this is over it). The header and the 4 bytes of ``hlen`` count, so a frame
    whose payload alone is at the limit is over it."""
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


#: a payload up to this size is copied into one buffer with its frame (a copy costs less than
#: writing a list of parts); a larger one is written from its own buffer
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
    """Large-frame buffers, reused once nothing refers to them any more.

    A fresh ``bytearray`` of a MiB is zero-filled by the allocator's caller (a memset of every
    byte) and, where the allocator maps fresh memory (any process whose glibc is not tuned, the
    caller's among them), faults in 256 new pages; the frame's bytes then overwrite all of it.
    A buffer whose every view (payloads, segments cut from them) is gone is handed out again
    instead (a bytearray knows whether views of it exist: see :meth:`_free`). The pool refers
    to at most :data:`POOL_BYTES`; a frame that arrives while it is full of buffers still in
    use gets a buffer of its own, as before. A frame is handed out only once every byte of it
    was received, so nothing of an earlier frame is ever seen in a later one.
    """

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()  # decoders on several threads (a client's and a test's)
        #: buffers handed out again, and buffers made (for tests and benches)
        self.reused = 0
        self.made = 0

    @staticmethod
    def _free(buf: bytearray) -> bool:
        """Nothing uses ``buf``: it has no view left (a bytearray with one cannot change size;
        growing by one byte fits in the byte :func:`_new` allocated beyond it, so no copy)."""
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
    """A writable buffer for a large frame. Up to :data:`HUGE_FRAME` from :data:`POOL` (a buffer
    no one uses any more, else a new one from the heap: the allocator hands the same resident
    memory back frame after frame, where fresh pages cost a page fault each, and returning them
    an ``munmap``); above it anonymous memory, whose pages are only taken as the frame
    arrives."""
    if size < HUGE_FRAME:
        return POOL.take(size)
    return memoryview(mmap.mmap(-1, size))


class FrameDecoder:
    """Accumulates bytes in any split and yields complete frames.

    The size limit is checked as soon as a length prefix is readable, before any
    of the body is buffered, so an oversized frame costs the receiver 4 bytes.

    :meth:`next_frame` hands out one frame at a time so the owner can change
    :attr:`max_frame` between two frames that arrived in the same read (the limit
    grows once the handshake completes); :meth:`feed` is the batch form.

    A large frame is received into one buffer of its size (:func:`frame_buffer`); a reader
    that can read into memory (``recv_into``, ``readv``) asks :meth:`read_buffer` where the
    next bytes go and reports them with :meth:`wrote`: no read of a large frame is copied, and
    its payload is handed out as a view of that buffer.
    """

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed byte in _buf
        self._large: memoryview | None = None  # the large frame being received, in place
        self._filled = 0  # bytes of it received
        #: the full size of the large frame being received (prefix included), or 0: what the
        #: receiver must be ready to hold once it completes (small frames are not counted); an
        #: attribute, not a property, as a reader asks it on every read
        self.gathering = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos + (self._filled if self._large is not None else 0)

    def read_buffer(self) -> memoryview | None:
        """Where the next bytes may be read directly: the rest of the large frame being
        received; None when none is (read as usual and :meth:`add` the bytes)."""
        if not self.gathering or self._filled >= self.gathering:
            return None
        return self._frame()[self._filled :]

    def wrote(self, n: int) -> None:
        """``n`` bytes were read into :meth:`read_buffer`'s view."""
        self._filled += n

    def _frame(self) -> memoryview:
        """The large frame's buffer, allocated on the first bytes after its prefix (so a peer
        whose reading is paused on that prefix pins nothing more), with what came before."""
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
        """``data`` as one frame, when it is exactly one whole small frame and nothing is
        buffered (a single call's message, read at once): the frame without copying ``data``
        into the buffer and out again. None: :meth:`add` it (and take :meth:`next_frame`),
        as for any other read; a frame over the limits also goes that way, to be refused."""
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
            self._compact()
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
        """Every frame complete now (after :meth:`add` or :meth:`wrote`). Raises
        RemoteProtocolError."""
        frames: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
