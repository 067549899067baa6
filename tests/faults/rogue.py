"""A policy that breaks the contract in every way listed in ``tests/faults/breaches.py``,
in its own process, for the fault matrix.

    python -m tests.faults.rogue unix:/PATH

Describe: it decides mail_from and end_of_message, with the headers in end of
message, and may add headers (nothing else). Well-behaved, it continues
mail_from and at end of message rejects a Subject holding REJECT with
``550 5.7.1 marked`` or adds ``X-Bench: 1`` (as bench/sdk_policy.py). Unlike
that one it also decides mail_from: then a stage other than end of message can
be answered wrongly, and an answer sent twice, or too early, has a later
question to be taken for.

It starts well-behaved. SIGUSR1 turns it rogue, the next SIGUSR1 good again;
each switch prints ``mode rogue`` or ``mode good`` once it holds (a test's
barrier). While rogue it numbers the SMTP sessions it sees from 0, by
StreamStart.session_id, so that a stream the bridge reopens keeps its session's
part: session n is well-behaved when n is odd, and else breaks the contract
with breach (n // 2) % len(BREACHES), in the order breaches.py lists them. So
2 * len(BREACHES) * R sessions hold every breach R times, whatever the order in
which the load's connections arrive. (Odd: the load marks messages 9, 19, 29 …,
and sessions arrive about in the load's order, so most marked messages reach a
well-behaved session, which rejects them.)

What it did is printed, one line each, for the test to compare with what the
bridge answered: ``session ID NAME`` (NAME a breach or ``well_behaved``) when a
rogue-mode session starts, and ``decided ID VERDICT`` (continue or reject) when
it gives its own verdict at end of message. The bridge names its session ids
``CONN.N``, CONN being its ``conn=`` in the log lines of that MTA connection.

Its Process responses go out as raw bytes (an identity serializer), so that it
can send bytes that are not a ProcessResponse.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from milter_bridge.v1 import policy_pb2 as pb
from tests.faults.breaches import BREACHES, Act, Call, Context, huge_answer, well_behaved

GOOD = "well_behaved"
SKIP, DECIDE = pb.EVENT_MODE_SKIP, pb.EVENT_MODE_DECIDE
CAPABILITIES = pb.Capabilities(
    events=pb.EventModes(
        connect=SKIP,
        helo=SKIP,
        mail_from=DECIDE,
        rcpt_to=SKIP,
        data=SKIP,
        header=SKIP,
        end_of_headers=SKIP,
        body=SKIP,
        end_of_message=DECIDE,
        unknown=SKIP,
        abort=SKIP,
    ),
    body_delivery=pb.BODY_DELIVERY_NONE,
    end_of_message_content=pb.EndOfMessageContent(headers=True),
    actions=pb.Actions(add_header=True),
)


def say(line: str) -> None:
    print(line, flush=True)


class Rogue:
    def __init__(self) -> None:
        self.rogue = False
        self.sessions = 0  # sessions seen since it turned rogue
        self.parts: dict[str, str] = {}  # session_id -> breach name (rogue mode)

    def switch(self) -> None:
        self.rogue = not self.rogue
        self.sessions = 0
        say(f"mode {'rogue' if self.rogue else 'good'}")

    def part(self, session_id: str) -> str:
        """The breach of a session (``well_behaved`` for none), the same for each of its streams."""
        if session_id in self.parts:
            return self.parts[session_id]
        if not self.rogue:
            return GOOD
        n, self.sessions = self.sessions, self.sessions + 1
        name = GOOD if n % 2 else list(BREACHES)[(n // 2) % len(BREACHES)]
        self.parts[session_id] = name
        say(f"session {session_id} {name}")
        return name

    async def describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.DescribeResponse:
        return pb.DescribeResponse(capabilities=CAPABILITIES, fingerprint="rogue-1")

    async def process(self, requests: AsyncIterator[pb.ProcessRequest], context: Context) -> None:
        start = (await anext(requests)).start
        name = self.part(start.session_id)
        act: Act = well_behaved if name == GOOD else BREACHES[name].act

        def record(verdict: str) -> None:
            if start.session_id in self.parts:
                say(f"decided {start.session_id} {verdict}")

        await act(Call(requests, context, record))


def _raw(response: bytes) -> bytes:
    return response  # the breaches serialize their responses themselves, or not at all


async def serve(address: str) -> None:
    huge_answer(3)  # end of message's, made before the socket is ready
    rogue = Rogue()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, rogue.switch)
    server = grpc.aio.server()
    handlers = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            rogue.describe,
            request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.DescribeResponse.SerializeToString,
        ),
        "Process": grpc.stream_stream_rpc_method_handler(
            rogue.process,
            request_deserializer=pb.ProcessRequest.FromString,
            response_serializer=_raw,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].startswith("unix:"):
        sys.exit("usage: python -m tests.faults.rogue unix:/PATH")
    asyncio.run(serve(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
