"""On a shared stream, whatever fails one session fails only that session: a real bridge
(one shared stream) in front of a real grpc.aio SharedPolicyService on port 0 that
breaks the contract for the sessions of one client host name and answers the others.

A well-behaved session is opened first and kept mid-message on the stream while the
breaking one runs: the breaking session gets the connect stage's failure action, and the
kept one is then answered on the same stream, which never broke (one stream opened)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc
from tests.runtime.mta_client import MtaClient
from tests.runtime.stack import test_config as bridge_config
from tests.session import harness as h

Breach = Callable[[pb.ProcessRequest], pb.SessionResponse | None]  # None: no answer


def _answer(request: pb.ProcessRequest, **fields: object) -> pb.SessionResponse:
    response = pb.ProcessResponse(sequence=request.sequence, **fields)  # type: ignore[arg-type]
    return pb.SessionResponse(response=response)


BREACHES: dict[str, Breach] = {
    "wrong sequence": lambda q: pb.SessionResponse(
        response=pb.ProcessResponse(
            sequence=q.sequence + 7, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
        )
    ),
    "invalid verdict": lambda q: _answer(q, verdict=pb.Verdict(action=pb.ACTION_UNSPECIFIED)),
    "discard at connect": lambda q: _answer(q, verdict=pb.Verdict(action=pb.ACTION_DISCARD)),
    "modifications at connect": lambda q: _answer(
        q, end_of_message=pb.EndOfMessageResponse(verdict=pb.Verdict(action=pb.ACTION_CONTINUE))
    ),
    "reply code of the wrong class": lambda q: _answer(
        q,
        verdict=pb.Verdict(
            action=pb.ACTION_REJECT, reply=pb.SmtpReply(code=450, lines=["not a 5xx"])
        ),
    ),
    "session error": lambda q: pb.SessionResponse(
        error=pb.SessionError(code=grpc.StatusCode.INTERNAL.value[0], message="a bug")
    ),
}

BAD_HOST = b"bad.example.test"


class SharedOnly(
    policy_pb2_grpc.PolicyServiceServicer, policy_pb2_grpc.SharedPolicyServiceServicer
):
    """Decides at connect and at end of message; breaks ``breach`` for sessions whose
    client is BAD_HOST, answers every other one with continue."""

    def __init__(self, breach: Breach) -> None:
        self.breach = breach
        self.sessions = 0

    async def Describe(  # noqa: N802 - gRPC method name
        self,
        request: pb.DescribeRequest,
        context: grpc.aio.ServicerContext[pb.DescribeRequest, pb.DescribeResponse],
    ) -> pb.DescribeResponse:
        caps = h.capabilities(h.SKIP, connect=h.DECIDE, end_of_message=h.DECIDE)
        caps.shared_streams = True
        return pb.DescribeResponse(capabilities=caps, fingerprint="shared-faults")

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessRequest],
        context: grpc.aio.ServicerContext[pb.ProcessRequest, pb.ProcessResponse],
    ) -> AsyncIterator[pb.ProcessResponse]:
        """Never called here: the bridge carries the sessions on the shared stream."""
        if not request_iterator:  # never true: context.abort() alone would not be a generator
            yield pb.ProcessResponse()
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "shared streams only")

    async def Sessions(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.SessionsRequest],
        context: grpc.aio.ServicerContext[pb.SessionsRequest, pb.SessionsResponse],
    ) -> AsyncIterator[pb.SessionsResponse]:
        async for batch in request_iterator:
            out = []
            for item in batch.requests:
                request = item.request
                if request.HasField("start"):
                    self.sessions += 1
                if not request.reply_expected:
                    continue
                connect = request.connect if request.HasField("connect") else None
                bad = connect is not None and connect.hostname == BAD_HOST.decode()
                if bad:
                    response = self.breach(request)
                else:
                    response = _answer(request, verdict=pb.Verdict(action=pb.ACTION_CONTINUE))
                if response is not None:
                    response.session = item.session
                    out.append(response)
            if out:
                yield pb.SessionsResponse(responses=out)


@contextlib.asynccontextmanager
async def bridged(policy: SharedOnly, **settings: object) -> AsyncIterator[Bridge]:
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, server)
    policy_pb2_grpc.add_SharedPolicyServiceServicer_to_server(policy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = Bridge(bridge_config(f"127.0.0.1:{port}", policy_streams=1, **settings))
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()
        await server.stop(0)


def bad_connect() -> list[cmd.MtaCommand]:
    return [
        cmd.DefineMacro(b"C", ((b"j", b"mx.example.test"),)),
        cmd.Connect(BAD_HOST, b"4", 40001, b"127.0.0.2"),
    ]


@pytest.mark.parametrize("breach", list(BREACHES))
async def test_a_session_breaking_the_contract_fails_alone(breach: str) -> None:
    policy = SharedOnly(BREACHES[breach])
    async with bridged(policy) as bridge:
        kept = await MtaClient.connect(bridge.port)
        bad = await MtaClient.connect(bridge.port)
        try:
            await kept.negotiate()
            assert await kept.command(*h.connect()) == [r.Continue()]
            await kept.send(*h.mail(), *h.rcpt())  # the kept session is mid-message

            await bad.negotiate()
            assert await bad.command(*bad_connect()) == [r.TempFail()]  # the failure action

            # The other session on the same stream goes on, answered by the policy.
            assert await kept.command(*h.eom()) == [r.Continue()]
            # And a new one after the breach: the stream never broke.
            again = await MtaClient.connect(bridge.port)
            try:
                await again.negotiate()
                assert await again.command(*h.connect()) == [r.Continue()]
            finally:
                await again.close()
        finally:
            await kept.close()
            await bad.close()
        assert bridge.shared is not None
        assert bridge.shared.opened == 1  # one stream all along
        assert policy.sessions == 3


async def test_a_late_session_fails_alone() -> None:
    """A session the policy never answers gets the failure action at its deadline; one
    answered beside it on the same stream is not held up."""
    held = asyncio.Event()

    def never(request: pb.ProcessRequest) -> None:
        held.set()

    policy = SharedOnly(never)
    deadlines = dict.fromkeys(bridge_config("x:1").deadlines, 1.0)
    async with bridged(policy, deadlines=deadlines) as bridge:
        bad = await MtaClient.connect(bridge.port)
        kept = await MtaClient.connect(bridge.port)
        await bad.negotiate()
        await bad.send(*bad_connect())
        await held.wait()  # the barrier: the policy holds the bad session
        await kept.negotiate()
        assert await kept.command(*h.connect()) == [r.Continue()]
        assert await bad.reply() == [r.TempFail()]  # at its deadline
        await kept.send(*h.mail(), *h.rcpt())
        assert await kept.command(*h.eom()) == [r.Continue()]
        await kept.close()
        await bad.close()
        assert bridge.shared is not None
        assert bridge.shared.opened == 1
