"""Property tests: every command and reply round-trips, and framing survives any split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from milter_bridge.protocol import (
    CommandDecoder,
    FrameDecoder,
    ReplyDecoder,
    decode_command,
    decode_reply,
    encode,
    encode_all,
)
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.replies import MilterReply
from tests.protocol.strategies import commands, replies


@given(commands)
def test_command_round_trips(command: MtaCommand) -> None:
    packet = encode(command)
    (frame,) = FrameDecoder().feed(packet)
    assert frame.code == command.code
    assert decode_command(frame) == command
    assert encode(decode_command(frame)) == packet


@given(replies)
def test_reply_round_trips(reply: MilterReply) -> None:
    packet = encode(reply)
    (frame,) = FrameDecoder().feed(packet)
    assert decode_reply(frame) == reply
    assert encode(decode_reply(frame)) == packet


@given(st.lists(commands, min_size=1, max_size=6))
def test_commands_split_at_every_offset(sequence: list[MtaCommand]) -> None:
    stream = encode_all(sequence)
    for cut in range(len(stream) + 1):
        decoder = CommandDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == sequence, cut
        assert decoder.frames.buffered == 0


@given(st.lists(replies, min_size=1, max_size=6))
def test_replies_split_at_every_offset(sequence: list[MilterReply]) -> None:
    stream = encode_all(sequence)
    for cut in range(len(stream) + 1):
        decoder = ReplyDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == sequence, cut


@given(st.lists(commands, min_size=1, max_size=4))
def test_commands_byte_by_byte(sequence: list[MtaCommand]) -> None:
    stream = encode_all(sequence)
    decoder = CommandDecoder()
    got: list[MtaCommand] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == sequence
