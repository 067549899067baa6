"""What one policy stream may hold of answers nobody asked for yet: bounded in count and
bytes, so that a broken policy cannot fill the bridge's memory (real grpc.aio server)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from milter_bridge.upstream.channel import make_channel, process_method
from milter_bridge.upstream.stream import MAX_UNREAD_BYTES, PolicyStream, StreamFailure
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.policy import RawPolicyServer, ScriptedPolicy
from tests.session import harness as h


# Wire bytes of an unknown field (number 1000, length-delimited): a ProcessResponse
# parses with it, so a valid answer can be as large as a test needs.
def padded(response: pb.ProcessResponse, size: int) -> bytes:
    key = bytes([0xC2, 0x3E])  # (1000 << 3) | 2 as a varint
    length = bytearray()
    n = size
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return response.SerializeToString() + key + bytes(length) + b"x" * size


class Flooding(ScriptedPolicy):
    """Answers `start` with ``answers`` at once, then ends the stream."""

    def __init__(self, answers: list[bytes]) -> None:
        super().__init__(h.capabilities(connect=h.DECIDE))
        self.answers = answers

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessRequest],
        context: grpc.aio.ServicerContext[pb.ProcessRequest, pb.ProcessResponse],
    ) -> AsyncIterator[pb.ProcessResponse]:
        async for _ in request_iterator:
            for answer in self.answers:
                yield answer  # type: ignore[misc]
            return


async def unread_after_the_reader(answers: list[bytes]) -> list[object]:
    """What receive() gives once the stream's reader is done (the barrier: nothing
    more can arrive), until it raises."""
    server = RawPolicyServer(Flooding(answers))
    await server.start()
    channel = make_channel(server.target)
    stream = PolicyStream(process_method(channel), logging.LoggerAdapter(logging.getLogger()))
    until = asyncio.get_running_loop().time() + 30
    out: list[object] = []
    try:
        assert await stream.send(pb.ProcessRequest(sequence=1, start=pb.StreamStart()), until)
        assert stream._reader is not None
        await stream._reader
        while True:
            try:
                out.append((await stream.receive(until)).sequence)
            except StreamFailure as exc:
                out.append(str(exc))
                break
    finally:
        stream.cancel()
        await channel.close(None)
        await server.stop()
    return out


def answer(sequence: int) -> pb.ProcessResponse:
    return pb.ProcessResponse(sequence=sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE))


async def test_unread_answers_over_the_byte_bound_fail_the_stream() -> None:
    size = MAX_UNREAD_BYTES // 2 + 1  # two of them are over the bound
    got = await unread_after_the_reader([padded(answer(2), size), padded(answer(3), size)])
    assert got[0] == 2  # the first is kept; with the second the stream fails
    assert len(got) == 2, got
    assert "MiB of them" in str(got[1]), got


async def test_unread_answers_under_the_bounds_all_arrive() -> None:
    # The control: the same shape, smaller, ends normally (the policy ended the stream).
    got = await unread_after_the_reader([padded(answer(2), 1000), padded(answer(3), 1000)])
    assert got == [2, 3, "the policy ended the stream without answering"]


@pytest.mark.parametrize("count", [64, 65])
async def test_unread_answers_over_the_count_bound_fail_the_stream(count: int) -> None:
    got = await unread_after_the_reader([answer(n).SerializeToString() for n in range(count)])
    if count == 64:
        assert got[-1] == "the policy ended the stream without answering"
        assert len(got) == 65
    else:
        assert "unasked responses" in str(got[-1]), got[-1]
        assert len(got) == 65
