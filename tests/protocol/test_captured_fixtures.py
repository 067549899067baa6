"""Golden bytes from real peers: every captured packet decodes and re-encodes identically."""

from __future__ import annotations

import pytest

from milter_bridge.protocol import (
    CommandDecoder,
    FrameDecoder,
    decode_command,
    decode_reply,
    encode,
)
from tests.captured import Capture, all_captures

CAPTURES = all_captures()

# What the captures must contain: every command and reply byte of versions 2-6
# except QUIT_NC, which no real peer sends (Postfix opens a new milter
# connection per SMTP session; Sendmail never sends it; miltertest cannot).
COMMANDS = set(b"ODCHMRTLNBEUAQ")
REPLIES = set(b"Ocartdyspmih+-2ebq")


def test_every_command_and_reply_byte_is_captured() -> None:
    seen_commands = {p.frame[4] for c in CAPTURES for p in c.packets if p.from_mta}
    seen_replies = {p.frame[4] for c in CAPTURES for p in c.packets if not p.from_mta}
    assert COMMANDS - seen_commands == set()
    assert REPLIES - seen_replies == set()
    assert b"K"[0] not in seen_commands  # if a peer ever sends it, add it above


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda c: c.name)
def test_every_packet_round_trips(capture: Capture) -> None:
    for packet in capture.packets:
        (frame,) = FrameDecoder().feed(packet.frame)
        message = decode_command(frame) if packet.from_mta else decode_reply(frame)
        assert message.code == packet.code
        assert encode(message) == packet.frame, message


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda c: c.name)
def test_the_mta_stream_in_uneven_reads(capture: Capture) -> None:
    stream = b"".join(p.frame for p in capture.packets if p.from_mta)
    expected = [decode_command(f) for f in FrameDecoder().feed(stream)]
    decoder = CommandDecoder()
    got = []
    for start in range(0, len(stream), 1000):
        got += decoder.feed(stream[start : start + 1000])
    assert got == expected
    assert decoder.frames.buffered == 0


def test_known_facts_of_the_captures() -> None:
    by_name = {c.name: c for c in CAPTURES}
    offer = decode_command(FrameDecoder().feed(by_name["postfix-smtpd-v2"].packets[0].frame)[0])
    assert (offer.version, offer.actions, offer.protocol) == (2, 0x1FF, 0x7F)  # type: ignore[union-attr]
    ipv6 = [
        decode_command(FrameDecoder().feed(p.frame)[0])
        for p in by_name["sendmail-daemon-ipv6"].packets
        if p.code == b"C"
    ]
    assert ipv6[0].address.startswith(b"IPv6:")  # type: ignore[union-attr]
