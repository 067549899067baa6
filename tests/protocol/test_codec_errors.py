"""Bad input: each case raises the ProtocolError that closes the connection, clearly worded."""

from __future__ import annotations

import struct

import pytest

from milter_bridge.protocol import (
    CommandDecoder,
    FrameDecoder,
    FrameTooLarge,
    MalformedPacket,
    ReplyDecoder,
    UnknownCommand,
    encode,
)
from milter_bridge.protocol.commands import Body, Header


def packet(code: bytes, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


def test_cap_is_checked_before_the_payload_arrives() -> None:
    decoder = FrameDecoder(max_packet_size=1000)
    with pytest.raises(FrameTooLarge, match="1001 bytes exceeds the limit of 1000"):
        decoder.feed(struct.pack("!I", 1001) + b"B")


def test_default_cap_is_1_mib_and_a_100_kb_header_fits() -> None:
    header = Header(b"X-Big", b"v" * 100_000)
    assert CommandDecoder().feed(encode(header)) == [header]
    body = Body(b"x" * ((1 << 20) - 1))
    assert CommandDecoder().feed(encode(body)) == [body]
    with pytest.raises(FrameTooLarge):
        CommandDecoder().feed(encode(Body(b"x" * (1 << 20))))


def test_cap_is_configurable() -> None:
    big = Body(b"x" * (4 << 20))
    assert CommandDecoder(max_packet_size=8 << 20).feed(encode(big)) == [big]


def test_zero_length_packet() -> None:
    with pytest.raises(MalformedPacket, match="length 0"):
        FrameDecoder().feed(b"\0\0\0\0")


def test_truncated_frame_stays_buffered() -> None:
    decoder = CommandDecoder()
    assert decoder.feed(packet(b"H", b"client\0")[:-3]) == []
    assert decoder.frames.buffered > 0  # the connection layer reports this at EOF


@pytest.mark.parametrize("code", [b"Z", b"\0", b"f", b"c"])
def test_unknown_command_byte(code: bytes) -> None:
    with pytest.raises(UnknownCommand, match="unknown command byte"):
        CommandDecoder().feed(packet(code, b""))


def test_unknown_reply_byte() -> None:
    with pytest.raises(UnknownCommand, match="unknown reply byte"):
        ReplyDecoder().feed(packet(b"Z", b""))


@pytest.mark.parametrize(
    ("code", "payload", "problem"),
    [
        (b"O", b"\0\0\0\6\0\0", "truncated 32-bit"),
        (b"O", b"\0" * 13, "trailing"),
        (b"H", b"no-nul", "without terminating NUL"),
        (b"C", b"host\0", "missing byte"),
        (b"C", b"host\0X", "unknown address family"),
        (b"C", b"host\x004\0", "truncated 16-bit"),
        (b"C", b"host\x004\0\x19addr", "without terminating NUL"),
        (b"L", b"Subject\0", "without terminating NUL"),
        (b"M", b"", "no address"),
        (b"D", b"", "missing byte"),
        (b"D", b"Cj\0", "without a value"),
        (b"U", b"HELP\0x", "trailing bytes"),
    ],
)
def test_malformed_commands(code: bytes, payload: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        CommandDecoder().feed(packet(code, payload))


@pytest.mark.parametrize(
    ("code", "payload", "problem"),
    [
        (b"O", b"\0\0\0\6\0\0\0\0\0\0\0\0\0\0\0\x09x\0", "unknown macro stage 9"),
        (b"c", b"x", "trailing"),
        (b"m", b"\0\0\0\1Subject\0", "without terminating NUL"),
        (b"y", b"550 no", "without terminating NUL"),
        (b"e", b"<a>\0args\0more\0", "trailing"),
    ],
)
def test_malformed_replies(code: bytes, payload: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        ReplyDecoder().feed(packet(code, payload))
