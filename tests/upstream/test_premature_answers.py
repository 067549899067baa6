"""An answer that arrives before the request it names was written cannot answer it, though
its sequence matches by the time it is read: the stream refuses it (cause invalid_reply).
Answers naming a request already written, or one never written, are handed on; the session
refuses those that do not name the awaited one (real grpc.aio server)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from milter_bridge.upstream.channel import make_channel, process_method
from milter_bridge.upstream.stream import PolicyStream, StreamFailure
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.policy import RawPolicyServer
from tests.upstream.test_stream_bounds import Flooding, answer


async def received_after(answers: list[bytes], then: int) -> list[object]:
    """The policy sends ``answers`` on `start` and ends the stream; once every one of
    them was read, request ``then`` is written: what receive() gives, until it raises."""
    server = RawPolicyServer(Flooding(answers))
    await server.start()
    channel = make_channel(server.target)
    stream = PolicyStream(process_method(channel), logging.LoggerAdapter(logging.getLogger()))
    until = asyncio.get_running_loop().time() + 30
    out: list[object] = []
    try:
        assert await stream.send(pb.ProcessRequest(sequence=1, start=pb.StreamStart()), until)
        assert stream._reader is not None
        await stream._reader  # the barrier: every answer was read, with only `start` written
        request = pb.ProcessRequest(sequence=then, reply_expected=True, data=pb.Data())
        await stream.send(request, until)  # refused by the ended call; written all the same
        while True:
            try:
                out.append((await stream.receive(until)).sequence)
            except StreamFailure as exc:
                out.append((str(exc), exc.cause))
                break
    finally:
        stream.cancel()
        await channel.close(None)
        await server.stop()
    return out


ENDED = ("the policy ended the stream without answering", "stream_error")


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        # Names request 2 before it was written: refused at once.
        (2, [("the policy answered sequence 2 before it was sent", "invalid_reply")]),
        # Names `start`, written before: handed on (the session refuses a stale sequence).
        (1, [1, ENDED]),
        # Names a request never written: handed on (the session refuses a wrong sequence).
        (3, [3, ENDED]),
    ],
    ids=["before-it-was-sent", "already-sent", "never-sent"],
)
async def test_an_answer_is_refused_when_its_request_was_written_after_it(
    sequence: int, expected: list[object]
) -> None:
    assert await received_after([answer(sequence).SerializeToString()], then=2) == expected
