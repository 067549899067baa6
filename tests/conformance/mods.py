"""Helpers for end-of-message modification scenarios."""

from __future__ import annotations

from milter_bridge.v1 import policy_pb2 as pb
from tests.conformance.conftest import World
from tests.conformance.smtp import Message, send
from tests.mta.sink import Received
from tests.runtime.policy import Decide, verdict

M = pb.Modification
HEADERS: list[tuple[str, bytes]] = [
    ("X-A", b"1"),
    ("X-Rep", b"first"),
    ("X-Rep", b"second"),
    ("X-B", b"2"),
]


def at_end(*mods: pb.Modification, final: int = pb.ACTION_CONTINUE) -> Decide:
    async def decide(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") != "end_of_message":
            return [verdict(request)]
        answer = pb.EndOfMessageResponse(
            modifications=list(mods),
            verdict=pb.Verdict(action=final),  # type: ignore[arg-type]
        )
        return [pb.ProcessResponse(sequence=request.sequence, end_of_message=answer)]

    return decide


async def modified(
    world: World, mta: str, *mods: pb.Modification, message: Message | None = None
) -> Received:
    world.policy.decide = at_end(*mods)
    transcript = await send(world.mtas[mta].port, message or Message(headers=HEADERS))
    assert transcript.accepted, transcript
    return await world.sink.next()


# Headers the MTA makes itself, whose values change every time: compared by name.
_MTA_MADE = {"received", "message-id", "date"}


def block(received: Received) -> list[tuple[str, str]]:
    """The delivered header block; the MTA's own headers by name only."""
    return [(n, "" if n.lower() in _MTA_MADE else v) for n, v in received.headers]
