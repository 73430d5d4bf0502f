"""Plain data across a process boundary: the typed value encoding and the message framing used
between the grading parent, the judge and the candidate (see :mod:`omniopd.evaluation.verdict`).

This file is also shipped, as source, into the sandboxed judge and candidate processes (which see no
project files) and installed there as the module ``omniopd_wire``; it imports only the standard
library.

**Values.** :func:`encode` turns a value into JSON-compatible data that says its type:
``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``bytearray``, ``complex``, ``list``,
``tuple``, ``dict``, ``set`` and ``frozenset`` (nested up to :data:`MAX_DEPTH`), and those builtin types
themselves (``int`` as a value). Subclasses of these
are encoded as their base type through the base type's own methods, so a subclass's ``__eq__``,
``__iter__`` or ``__repr__`` never survives the trip (a ``namedtuple`` arrives as a ``tuple``, a
``Counter`` as a ``dict``, an ``int`` subclass as its integer value). numpy scalars and arrays are
encoded through ``tolist()``. Anything else (a generator, a custom object, a function) raises
:class:`Unsupported`. :func:`decode` rebuilds plain Python objects from that data and nothing else:
decoding never runs code of the sender's choosing.

**Messages.** A message is a JSON object, framed as a 4-byte big-endian length and the UTF-8 text.
"""

from __future__ import annotations

import json
import math
import os
import struct

MAX_DEPTH = 100  # nesting limit of an encoded value
MAX_MESSAGE_BYTES = 1 << 30  # a larger frame is a protocol error
_SAFE_INT = 1 << 53  # larger integers travel as hex text (no digit limit, exact)
# builtin types that travel by name (a test may pass ``int`` as an argument, as MBPP's remove_datatype does)
_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (int, float, complex, str, bytes, bytearray, bool, list, tuple, dict, set, frozenset, type(None))
}


class Unsupported(TypeError):
    """A value that cannot be encoded as plain data."""


class ProtocolError(Exception):
    """A malformed message or value."""


def encode(value, depth: int = 0):
    """The typed plain-data form of ``value`` (see the module docstring)."""
    if depth > MAX_DEPTH:
        raise Unsupported(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or type(value) is bool:
        return value
    if isinstance(value, int):
        number = int.__int__(value)
        return number if -_SAFE_INT < number < _SAFE_INT else {"int": format(number, "x")}
    if isinstance(value, float):
        real = float.__float__(value)
        return real if math.isfinite(real) else {"float": repr(real)}
    if isinstance(value, str):
        return str.__str__(value)
    d = depth + 1
    if isinstance(value, list):
        return [encode(item, d) for item in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"tuple": [encode(item, d) for item in tuple.__iter__(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, d), encode(v, d)] for k, v in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"frozenset": [encode(item, d) for item in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"set": [encode(item, d) for item in set.__iter__(value)]}
    if isinstance(value, complex):
        return {"complex": [encode(complex.real.__get__(value), d), encode(complex.imag.__get__(value), d)]}
    if isinstance(value, bytearray):
        return {"bytearray": bytes(value).hex()}
    if isinstance(value, bytes):
        return {"bytes": bytes.hex(value)}
    if isinstance(value, type) and _TYPES.get(value.__name__) is value:
        return {"type": value.__name__}
    module = getattr(type(value), "__module__", "") or ""
    if module.split(".")[0] == "numpy" and hasattr(value, "tolist"):
        return encode(value.tolist(), d)
    raise Unsupported(f"a value of type {type(value).__name__} is not plain data")


def decode(data, depth: int = 0):
    """The plain Python value of encoded ``data``; :class:`ProtocolError` when it is malformed."""
    if depth > MAX_DEPTH + 1:
        raise ProtocolError("value nested too deeply")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    d = depth + 1
    if isinstance(data, list):
        return [decode(item, d) for item in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise ProtocolError(f"malformed value: {type(data).__name__}")
    ((tag, body),) = data.items()
    try:
        if tag == "int":
            return int(body, 16)
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "tuple":
            return tuple(decode(item, d) for item in body)
        if tag == "dict":
            return {decode(k, d): decode(v, d) for k, v in body}
        if tag == "set":
            return {decode(item, d) for item in body}
        if tag == "frozenset":
            return frozenset(decode(item, d) for item in body)
        if tag == "complex":
            re_, im = (decode(x, d) for x in body)
            return complex(re_, im)
        if tag == "bytes":
            return bytes.fromhex(body)
        if tag == "bytearray":
            return bytearray.fromhex(body)
        if tag == "type":
            return _TYPES[body]
    except ProtocolError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # unhashable set items, bad hex, wrong shapes
        raise ProtocolError(f"malformed {tag} value: {exc}") from None
    raise ProtocolError(f"unknown value tag {tag!r}")


def pack(message: dict) -> bytes:
    """One framed message."""
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(body)) + body


class FrameReader:
    """Collects framed messages from bytes fed in any pieces."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = struct.unpack(">I", self._buf[:4])
            if size > self._limit:
                raise ProtocolError(f"message of {size} bytes is over the limit of {self._limit}")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            try:
                message = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise ProtocolError(f"message is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise ProtocolError("message is not a JSON object")
            out.append(message)
        return out


class Channel:
    """Blocking framed messages over a pair of file descriptors (used inside the sandbox)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self._reader = FrameReader()
        self._pending: list[dict] = []

    def send(self, message: dict) -> None:
        data = memoryview(pack(message))
        while data:
            data = data[os.write(self.write_fd, data) :]

    def recv(self) -> dict | None:
        """The next message, or None when the other side closed the channel."""
        while not self._pending:
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                return None
            self._pending.extend(self._reader.feed(chunk))
        return self._pending.pop(0)
