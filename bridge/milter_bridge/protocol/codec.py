"""Bytes in, typed messages out, and back: framing for both directions of the milter protocol.

A packet is ``uint32 length | command byte | payload`` where the length counts
the command byte and the payload. Decoders take bytes as they arrive (any
split) and return whole messages; they keep at most one packet plus the
length prefix buffered, and refuse a length above ``max_packet_size`` before
reading the payload, so a hostile peer cannot make them buffer more.
No I/O here: the caller reads the socket and feeds the bytes in.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from milter_bridge.protocol.commands import COMMAND_PARSERS, MtaCommand
from milter_bridge.protocol.errors import FrameTooLarge, MalformedPacket, UnknownCommand
from milter_bridge.protocol.replies import REPLY_PARSERS, MilterReply
from milter_bridge.protocol.wire import u32

# Default cap on a packet (length prefix value). Postfix sends a header of up to
# header_size_limit (100 KB) as one packet, and body chunks of 64 KiB.
DEFAULT_MAX_PACKET_SIZE = 1 << 20

_LEN = struct.Struct("!I")
_T = TypeVar("_T")


def encode(message: MtaCommand | MilterReply) -> bytes:
    """The whole packet for one command or reply."""
    payload = message.payload()
    return u32(len(payload) + 1) + message.code + payload


def encode_all(messages: list[MtaCommand] | list[MilterReply]) -> bytes:
    """Several packets concatenated: what goes out in one write."""
    return b"".join(encode(m) for m in messages)


@dataclass(frozen=True, slots=True)
class Frame:
    """One packet: its command byte and payload."""

    code: bytes
    payload: bytes


class FrameDecoder:
    """Reassembles packets from arbitrarily split reads."""

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        if max_packet_size < 1:
            msg = f"max_packet_size must be at least 1, not {max_packet_size}"
            raise ValueError(msg)
        self.max_packet_size = max_packet_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held; non-zero at EOF means a truncated frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        return [Frame(code, payload) for code, payload in self.packets(data)]

    def packets(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """``feed`` as (command byte, payload) pairs, without a Frame for each."""
        if self._buf:
            self._buf += data
            held = self._buf
            if len(held) < 4:
                return []
            (length,) = _LEN.unpack_from(held, 0)
            if 0 < length <= self.max_packet_size and len(held) < 4 + length:
                return []  # still inside one packet: nothing copied until it is whole
            buf = bytes(held)
        else:
            buf = data  # the common case: whole packets, sliced without a copy first
        packets: list[tuple[bytes, bytes]] = []
        pos = 0
        size = len(buf)
        while size - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if length == 0:
                msg = "packet of length 0 has no command byte"
                raise MalformedPacket(msg)
            if length > self.max_packet_size:
                msg = (
                    f"packet of {length} bytes exceeds the limit of {self.max_packet_size}"
                    f" (command byte {bytes(buf[pos + 4 : pos + 5])!r})"
                )
                raise FrameTooLarge(msg)
            end = pos + 4 + length
            if end > size:
                break
            packets.append((buf[pos + 4 : pos + 5], buf[pos + 5 : end]))
            pos = end
        self._buf = bytearray(buf[pos:]) if pos < size else bytearray()
        return packets


def _parse(
    code: bytes, payload: bytes, parsers: dict[bytes, Callable[[bytes], _T]], side: str
) -> _T:
    parse = parsers.get(code)
    if parse is None:
        msg = f"unknown {side} byte {code!r} (payload {payload[:32]!r})"
        raise UnknownCommand(msg)
    return parse(payload)


def _decode(frame: Frame, parsers: dict[bytes, Callable[[bytes], _T]], side: str) -> _T:
    return _parse(frame.code, frame.payload, parsers, side)


def decode_command(frame: Frame) -> MtaCommand:
    """A command the MTA sent; raises UnknownCommand or MalformedPacket."""
    return _decode(frame, COMMAND_PARSERS, "command")


def decode_reply(frame: Frame) -> MilterReply:
    """A reply a milter sent; raises UnknownCommand or MalformedPacket."""
    return _decode(frame, REPLY_PARSERS, "reply")


class CommandDecoder:
    """Milter side: bytes from the MTA in, commands out."""

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        self.frames = FrameDecoder(max_packet_size)

    def feed(self, data: bytes) -> list[MtaCommand]:
        packets = self.frames.packets(data)  # no Frame object per packet on this hot path
        return [_parse(code, payload, COMMAND_PARSERS, "command") for code, payload in packets]


class ReplyDecoder:
    """MTA side (tests, tools): bytes from a milter in, replies out."""

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        self.frames = FrameDecoder(max_packet_size)

    def feed(self, data: bytes) -> list[MilterReply]:
        return [decode_reply(f) for f in self.frames.feed(data)]
