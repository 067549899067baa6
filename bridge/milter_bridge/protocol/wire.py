"""Reading and writing the field types milter payloads are made of.

C strings are NUL-terminated; argv-like fields are several C strings in a row;
integers are 32-bit (16-bit for the CONNECT port) big-endian.
"""

from __future__ import annotations

import struct

from milter_bridge.protocol.errors import MalformedPacket, quoted

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")


def u32(value: int) -> bytes:
    return _U32.pack(value)


def u16(value: int) -> bytes:
    return _U16.pack(value)


def cstr(value: bytes) -> bytes:
    """One C string; a NUL inside would split the field, so it is refused."""
    if b"\0" in value:
        msg = f"NUL byte inside a milter string field: {quoted(value)}"
        raise ValueError(msg)
    return value + b"\0"


class Reader:
    """Consumes one packet payload field by field, raising MalformedPacket on a short read."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def error(self, problem: str) -> MalformedPacket:
        return MalformedPacket(f"{self._what}: {problem} (payload {self._data[:64]!r})")

    def u32(self) -> int:
        end = self._pos + 4
        if end > len(self._data):
            raise self.error("truncated 32-bit integer")
        (value,) = _U32.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def u16(self) -> int:
        end = self._pos + 2
        if end > len(self._data):
            raise self.error("truncated 16-bit port")
        (value,) = _U16.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def byte(self) -> bytes:
        if self._pos >= len(self._data):
            raise self.error("missing byte")
        value = self._data[self._pos : self._pos + 1]
        self._pos += 1
        return value

    def cstr(self) -> bytes:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise self.error("string without terminating NUL")
        value = self._data[self._pos : end]
        self._pos = end + 1
        return value

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    def at_end(self) -> bool:
        return self._pos >= len(self._data)

    def cstrs(self) -> tuple[bytes, ...]:
        """All remaining C strings (an argv); the payload must end with NUL."""
        data, pos = self._data, self._pos
        if pos >= len(data):
            return ()
        if data[-1] != 0:
            self._pos = data.rfind(b"\0", pos) + 1 if b"\0" in data[pos:] else pos
            raise self.error("string without terminating NUL")
        self._pos = len(data)
        return tuple(data[pos:-1].split(b"\0"))

    def end(self) -> None:
        if not self.at_end():
            raise self.error(f"{len(self._data) - self._pos} unexpected trailing bytes")
