"""Serving a Policy over gRPC: PolicyService, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc
from milter_policy.dispatch import Dispatcher
from milter_policy.policy import Policy
from milter_policy.security import BearerTokenCheck, ServerTls
from milter_policy.shared import SharedService

log = logging.getLogger("milter_policy")

__all__ = ["PolicyServer"]

_END = object()


class _Service(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, policy: Policy, executor: ThreadPoolExecutor) -> None:
        self.policy = policy
        self.executor = executor
        self.capabilities = policy.capabilities()
        self.fingerprint = policy.fingerprint
        self.replica = socket.gethostname()  # PolicyServer adds the port once it has one

    async def Describe(  # noqa: N802 - gRPC method name
        self,
        request: pb.DescribeRequest,  # noqa: ARG002
        context: grpc.aio.ServicerContext[pb.DescribeRequest, pb.DescribeResponse],  # noqa: ARG002
    ) -> pb.DescribeResponse:
        return pb.DescribeResponse(capabilities=self.capabilities, fingerprint=self.fingerprint)

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessRequest],
        context: grpc.aio.ServicerContext[pb.ProcessRequest, pb.ProcessResponse],
    ) -> AsyncIterator[pb.ProcessResponse]:
        out: asyncio.Queue[object] = asyncio.Queue()
        dispatcher = Dispatcher(self.policy, self.executor, on_progress=out.put_nowait)

        async def consume() -> None:
            try:
                async for request in request_iterator:
                    if request.HasField("start") and request.start.fingerprint not in (
                        "",
                        self.fingerprint,
                    ):
                        out.put_nowait(grpc.StatusCode.FAILED_PRECONDITION)
                        return
                    if request.HasField("start"):
                        log.info("connection %s", request.start.session_id)
                        # Tells the bridge which replica took the stream (per-replica metrics).
                        await context.send_initial_metadata(
                            (("milter-policy-replica", self.replica),)
                        )
                    for response in await dispatcher.handle(request):
                        out.put_nowait(response)
                await dispatcher.close()
            finally:
                out.put_nowait(_END)

        task = asyncio.create_task(consume())
        try:
            while (item := await out.get()) is not _END:
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "the policy's capabilities changed")
                assert isinstance(item, pb.ProcessResponse)
                yield item
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class PolicyServer:
    """A Policy on a gRPC port: ``await server.start()``, ``await server.stop()``."""

    def __init__(
        self,
        policy: Policy,
        address: str,
        *,
        max_connection_age: float | None = None,
        max_connection_age_grace: float = 3600.0,
        tls: ServerTls | None = None,
        token_file: str | None = None,
    ) -> None:
        """``max_connection_age`` (seconds): end each bridge's HTTP/2 connection after this
        long, so that long-lived bridges spread over new replicas (Kubernetes); streams in
        flight then get ``max_connection_age_grace`` seconds, which must be longer than the
        longest SMTP session, or they are cut.

        ``tls``: serve TLS (mutual TLS when it names a client CA); ``token_file``: refuse
        calls without ``authorization: Bearer <the file's token>`` (health stays open)."""
        self.policy = policy
        self.address = address
        self.port = 0
        self._executor = ThreadPoolExecutor(policy.workers, thread_name_prefix=policy.name)
        options: list[tuple[str, object]] = [
            # so_reuseport off: a second server on the same port must fail, not share it.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        if max_connection_age is not None:
            options += [
                ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
                ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace * 1000)),
            ]
        self._tls = tls
        interceptors = [] if token_file is None else [BearerTokenCheck(token_file)]
        self._server = grpc.aio.server(options=options, interceptors=interceptors)

    async def start(self) -> None:
        """Listen and serve: PolicyService, SharedPolicyService, gRPC health (SERVING) and
        reflection."""
        servicer = _Service(self.policy, self._executor)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, self._server)
        shared = SharedService(
            self.policy, self._executor, servicer.fingerprint, lambda: servicer.replica
        )
        policy_pb2_grpc.add_SharedPolicyServiceServicer_to_server(shared, self._server)
        self._shared = shared
        health = self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self._server)
        service = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name
        reflection.enable_server_reflection(
            (
                service,
                pb.DESCRIPTOR.services_by_name["SharedPolicyService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        if self._tls is None:
            self.port = self._server.add_insecure_port(self.address)
        else:
            self.port = self._server.add_secure_port(self.address, self._tls.credentials())
        servicer.replica = f"{socket.gethostname()}:{self.port}"
        await self._server.start()
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "policy %r serving on %s (fingerprint %s)",
            self.policy.name,
            self.address,
            self.policy.fingerprint,
        )

    async def stop(self, grace: float | None = 30.0) -> None:
        """Stop taking streams; those in flight get ``grace`` seconds to end.

        Health turns NOT_SERVING first, so that readiness checks take this replica
        out of a load balancer while its streams drain. Shared streams are told to
        take no new sessions once gRPC stopped taking calls (so that the streams the
        bridge opens in their place go to other replicas)."""
        await self._health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self._server.stop(grace))
        await asyncio.sleep(0)  # the stop's first step: no new calls from here on
        self._shared.drain()
        await stopping
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        """Until the server has stopped."""
        await self._server.wait_for_termination()


async def serve_async(
    policy: Policy,
    address: str,
    *,
    grace: float = 30.0,
    max_connection_age: float | None = None,
    tls: ServerTls | None = None,
    token_file: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    server = PolicyServer(
        policy, address, max_connection_age=max_connection_age, tls=tls, token_file=token_file
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("policy %r stopping", policy.name)
    await server.stop(grace)
