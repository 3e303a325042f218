"""Encoding keys so that byte order is a useful order, and the stable default partitioner.

Keys reach ``reduce`` in the order of their encoded bytes. The encoding keeps the natural
order inside each type: ``None`` < booleans < integers < floats < text < bytes < tuples < lists
< anything else; integers numerically (any size up to 1016 bits), floats numerically, text by
code point, bytes bytewise, tuples and lists element by element (a prefix first). Any other
picklable key is encoded as its pickle (grouped correctly; ordered by pickle bytes). Note that
``1`` and ``1.0`` are different keys here.

The default partitioner hashes the encoded bytes with CRC-32: the same key goes to the same
reducer on every machine and every run (Python's ``hash()`` of text is salted per process).
"""

from __future__ import annotations

import pickle
import struct
import zlib
from typing import Any

PICKLE_PROTOCOL = 5

_NONE, _BOOL, _INT, _FLOAT, _STR, _BYTES, _TUPLE, _LIST = range(1, 9)
_PICKLE = 255
_END = b"\x00\x00"
_MAX_INT_BYTES = 127
_DOUBLE = struct.Struct(">Q")


def _escape(raw: bytes) -> bytes:
    return raw.replace(b"\x00", b"\x00\xff") + _END


def _encode_into(key: Any, out: bytearray) -> None:
    kind = type(key)
    if kind is str:
        out.append(_STR)
        out += _escape(key.encode("utf-8", "surrogatepass"))
    elif kind is int:
        _encode_int(key, out)
    elif kind is tuple or kind is list:
        out.append(_TUPLE if kind is tuple else _LIST)
        for item in key:
            _encode_into(item, out)
        out.append(0)
    elif key is None:
        out.append(_NONE)
    elif kind is bool:
        out += bytes((_BOOL, int(key)))
    elif kind is float:
        bits = _DOUBLE.unpack(struct.pack(">d", key))[0]
        bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)
        out.append(_FLOAT)
        out += _DOUBLE.pack(bits)
    elif kind is bytes:
        out.append(_BYTES)
        out += _escape(key)
    else:
        out.append(_PICKLE)
        out += _escape(pickle.dumps(key, PICKLE_PROTOCOL))


def _encode_int(n: int, out: bytearray) -> None:
    size = (abs(n).bit_length() + 7) // 8
    if size > _MAX_INT_BYTES:
        out.append(_PICKLE)
        out += _escape(pickle.dumps(n, PICKLE_PROTOCOL))
        return
    out.append(_INT)
    if n >= 0:
        out.append(128 + size)
        out += n.to_bytes(size, "big")
    else:
        out.append(127 - size)
        out += ((1 << (8 * size)) - 1 + n).to_bytes(size, "big")


def encode_text_key(key: str) -> bytes:
    """:func:`encode_key` of a text key (the common case), without the bytearray."""
    return b"\x05" + key.encode("utf-8", "surrogatepass").replace(b"\x00", b"\x00\xff") + _END


def encode_key(key: Any) -> bytes:
    """The key's bytes; equal keys give equal bytes, and byte order is the documented order."""
    if type(key) is str:
        return encode_text_key(key)
    out = bytearray()
    _encode_into(key, out)
    return bytes(out)


def _unescape(data: bytes, pos: int) -> tuple[bytes, int]:
    parts = []
    while True:
        zero = data.index(b"\x00", pos)
        parts.append(data[pos:zero])
        if data[zero + 1] == 0xFF:
            parts.append(b"\x00")
            pos = zero + 2
        else:
            return b"".join(parts), zero + 2


def _decode_at(data: bytes, pos: int) -> tuple[Any, int]:
    tag = data[pos]
    pos += 1
    if tag == _STR:
        raw, pos = _unescape(data, pos)
        return raw.decode("utf-8", "surrogatepass"), pos
    if tag == _INT:
        head = data[pos]
        pos += 1
        if head >= 128:
            size = head - 128
            return int.from_bytes(data[pos : pos + size], "big"), pos + size
        size = 127 - head
        value = int.from_bytes(data[pos : pos + size], "big") - ((1 << (8 * size)) - 1)
        return value, pos + size
    if tag in (_TUPLE, _LIST):
        items = []
        while data[pos] != 0:
            item, pos = _decode_at(data, pos)
            items.append(item)
        return (tuple(items) if tag == _TUPLE else items), pos + 1
    if tag == _NONE:
        return None, pos
    if tag == _BOOL:
        return bool(data[pos]), pos + 1
    if tag == _FLOAT:
        bits = _DOUBLE.unpack_from(data, pos)[0]
        bits = bits & ~(1 << 63) if bits >> 63 else bits ^ 0xFFFFFFFFFFFFFFFF
        return struct.unpack(">d", _DOUBLE.pack(bits))[0], pos + 8
    if tag == _BYTES:
        return _unescape(data, pos)
    if tag == _PICKLE:
        raw, pos = _unescape(data, pos)
        return pickle.loads(raw), pos
    raise ValueError(f"not an encoded key (tag {tag} at byte {pos - 1})")


def decode_key(data: bytes) -> Any:
    """The key :func:`encode_key` encoded."""
    if data[:1] == b"\x05" and data.count(b"\x00") == 2:
        return data[1:-2].decode("utf-8", "surrogatepass")
    key, end = _decode_at(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after an encoded key")
    return key


#: a value's first byte: text is stored as UTF-8 after this tag (no pickle per record); every
#: other value is a pickle, whose first byte is always the PROTO opcode (0x80)
TEXT_VALUE = b"S"
_TEXT_TAG = TEXT_VALUE[0]


def encode_value(value: Any) -> bytes:
    """A value's bytes in a run file: text as tagged UTF-8, anything else pickled."""
    if type(value) is str:
        return TEXT_VALUE + value.encode("utf-8", "surrogatepass")
    return pickle.dumps(value, PICKLE_PROTOCOL)


def decode_value(data: bytes) -> Any:
    """The value :func:`encode_value` encoded."""
    if data[0] == _TEXT_TAG:
        return data[1:].decode("utf-8", "surrogatepass")
    return pickle.loads(data)


def default_partition(encoded_key: bytes, n: int) -> int:
    """The reducer of a key among ``n``: stable across machines, runs and Python versions."""
    return zlib.crc32(encoded_key) % n
