"""A real grpc.aio policy service for tests, on port 0, whose behaviour each test scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc

# What the policy does with one request that expects a reply: return the
# responses to send (an awaitable may block on a test's event first).
Decide = Callable[[pb.ProcessRequest], Awaitable[list[pb.ProcessResponse]]]


def verdict(request: pb.ProcessRequest, action: int = pb.ACTION_CONTINUE) -> pb.ProcessResponse:
    return pb.ProcessResponse(sequence=request.sequence, verdict=pb.Verdict(action=action))  # type: ignore[arg-type]


async def always_continue(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    return [verdict(request)]


@dataclass
class Recorded:
    """One Process stream as the policy saw it."""

    requests: list[pb.ProcessRequest] = field(default_factory=list)
    ended_by_bridge: bool = False  # the bridge half-closed (normal end)
    cancelled: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # the handler returned

    def events(self) -> list[str]:
        return [str(r.WhichOneof("event")) for r in self.requests]


class ScriptedPolicy(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, capabilities: pb.Capabilities, fingerprint: str = "test-1") -> None:
        self.capabilities = capabilities
        self.fingerprint = fingerprint
        self.decide: Decide = always_continue
        self.streams: list[Recorded] = []
        self.describe_calls = 0
        self.described = asyncio.Event()  # set by every Describe call
        # Called with every request before it is handled (e.g. to be slow).
        self.on_request: Callable[[pb.ProcessRequest], Awaitable[None]] | None = None
        # Hooks for failure tests.
        self.refuse_streams = False
        self.end_stream_after_start = False
        self.unavailable_streams = 0  # fail this many streams with UNAVAILABLE at `start`
        self.stop_reading: asyncio.Event | None = None  # after `start`, read nothing until set
        self.fail_streams_with: grpc.StatusCode | None = None  # abort every stream at `start`

    async def Describe(  # noqa: N802 - gRPC method name
        self,
        request: pb.DescribeRequest,
        context: grpc.aio.ServicerContext[pb.DescribeRequest, pb.DescribeResponse],
    ) -> pb.DescribeResponse:
        self.describe_calls += 1
        self.described.set()
        return pb.DescribeResponse(capabilities=self.capabilities, fingerprint=self.fingerprint)

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessRequest],
        context: grpc.aio.ServicerContext[pb.ProcessRequest, pb.ProcessResponse],
    ) -> AsyncIterator[pb.ProcessResponse]:
        record = Recorded()
        self.streams.append(record)
        try:
            async for request in request_iterator:
                if self.on_request is not None:
                    await self.on_request(request)
                record.requests.append(request)
                if request.HasField("start"):
                    if self.unavailable_streams > 0:
                        self.unavailable_streams -= 1
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
                    if self.fail_streams_with is not None:
                        await context.abort(self.fail_streams_with, "policy bug")
                    if self.refuse_streams:
                        await context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION, "capabilities changed"
                        )
                    if self.end_stream_after_start:
                        return
                    if self.stop_reading is not None:
                        await self.stop_reading.wait()
                    continue
                if request.reply_expected:
                    for response in await self.decide(request):
                        yield response
            record.ended_by_bridge = True
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        finally:
            record.finished.set()


class PolicyServer:
    """Starts and stops a ScriptedPolicy on 127.0.0.1 (port 0 unless given)."""

    def __init__(self, policy: ScriptedPolicy) -> None:
        self.policy = policy
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self, port: int = 0) -> None:
        # so_reuseport off: a second server on the port must fail, not share it.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(self.policy, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port or self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _serialize(message: object) -> bytes:
    # Bytes as they are: how a policy sends something that is not a ProcessResponse.
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[attr-defined,no-any-return]


class RawPolicyServer(PolicyServer):
    """A ScriptedPolicy whose answers may also be raw bytes."""

    async def start(self, port: int = 0) -> None:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        policy = self.policy
        handlers = {
            "Describe": grpc.unary_unary_rpc_method_handler(
                policy.Describe,
                request_deserializer=pb.DescribeRequest.FromString,
                response_serializer=pb.DescribeResponse.SerializeToString,
            ),
            "Process": grpc.stream_stream_rpc_method_handler(
                policy.Process,
                request_deserializer=pb.ProcessRequest.FromString,
                response_serializer=_serialize,
            ),
        }
        service = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port or self.port}")
        await self._server.start()
