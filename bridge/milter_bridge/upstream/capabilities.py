"""The policy's capabilities: fetched at start, refreshed, waited for only briefly.

An MTA's option negotiation cannot wait long, so ``plan()`` returns the
cached plan at once and, before the first successful fetch, waits at most the
given bound; ``None`` then tells the connection to negotiate the minimum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from milter_bridge import __version__
from milter_bridge.session.plan import InvalidCapabilitiesError, Plan
from milter_bridge.upstream.security import Metadata, no_metadata
from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc

log = logging.getLogger("milter_bridge.upstream")

DESCRIBE_TIMEOUT = 5.0
FIRST_RETRY = 0.2


class CapabilitiesCache:
    """Keeps the current Plan, refreshing it every ``refresh`` seconds."""

    def __init__(
        self,
        stub: policy_pb2_grpc.PolicyServiceAsyncStub,
        refresh: float,
        health: health_pb2_grpc.HealthStub | None = None,
        metadata: Callable[[], Metadata] = no_metadata,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._health = health
        # The policy's grpc.health.v1 answer: True for SERVING or no health service.
        self.healthy = False
        self._refresh = refresh
        self._plan: Plan | None = None
        self._ready = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None

    @property
    def current(self) -> Plan | None:
        return self._plan

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="describe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def refresh_now(self) -> None:
        """Fetch again at once (a stream was refused with FAILED_PRECONDITION)."""
        self._wakeup.set()

    async def plan(self, wait: float) -> Plan | None:
        if self._plan is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)
        return self._plan

    async def _run(self) -> None:
        retry = FIRST_RETRY
        while True:
            delay = self._refresh
            try:
                await self._fetch()
                retry = FIRST_RETRY
            except (grpc.aio.AioRpcError, InvalidCapabilitiesError) as exc:
                self._report(exc)
                if self._plan is None:
                    delay, retry = retry, min(retry * 2, self._refresh)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    @property
    def ready(self) -> bool:
        """Capabilities known and the policy healthy (for /readyz)."""
        return self._plan is not None and self.healthy

    async def _check_health(self) -> None:
        if self._health is None:
            self.healthy = True
            return
        try:
            request = health_pb2.HealthCheckRequest(service="")
            answer = await self._health.Check(
                request, timeout=DESCRIBE_TIMEOUT, metadata=self._metadata()
            )
            self.healthy = answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            # A policy without a health service is judged by Describe alone.
            self.healthy = exc.code() is grpc.StatusCode.UNIMPLEMENTED

    async def _fetch(self) -> None:
        await self._check_health()
        request = pb.DescribeRequest(bridge_version=__version__)
        response = await self._stub.Describe(
            request, timeout=DESCRIBE_TIMEOUT, metadata=self._metadata()
        )
        plan = Plan.from_capabilities(response.capabilities, response.fingerprint)
        if self._plan is None or plan.capabilities != self._plan.capabilities:
            log.info(
                "policy capabilities %s (fingerprint %r)",
                "received" if self._plan is None else "changed",
                plan.fingerprint,
            )
        elif self._problem is not None:
            log.info("policy capabilities fetched again")
        self._problem = None
        self._plan = plan
        self._ready.set()

    def _report(self, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            problem = f"Describe failed: {exc.code().name}: {exc.details()}"
        else:
            problem = f"the policy's capabilities are invalid: {exc}"
        if problem != self._problem:  # once per change, not once per retry
            state = "keeping the previous ones" if self._plan else "none known yet"
            log.warning("%s (%s)", problem, state)
        self._problem = problem
