"""A policy on port 0 and a bridge pointed at it, in this event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.mta_client import MtaClient
from tests.runtime.policy import PolicyServer, ScriptedPolicy


@dataclass
class Stack:
    policy: ScriptedPolicy
    server: PolicyServer
    bridge: Bridge
    clients: list[MtaClient] = field(default_factory=list)

    async def connect(self) -> MtaClient:
        client = await MtaClient.connect(self.bridge.port)
        self.clients.append(client)
        return client

    async def negotiated(self) -> MtaClient:
        """A connection whose option negotiation is done."""
        client = await self.connect()
        await client.negotiate()
        return client


def test_config(upstream: str, **overrides: object) -> Config:
    config = Config(
        listen=Listen(ListenKind.INET, host="127.0.0.1", port=0),
        upstream=upstream,
        describe_wait=5.0,
        describe_refresh=60.0,
        grace_period=5.0,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    capabilities: pb.Capabilities, *, start_policy: bool = True, **config: object
) -> AsyncIterator[Stack]:
    policy = ScriptedPolicy(capabilities)
    server = PolicyServer(policy)
    if start_policy:
        await server.start()
        upstream = server.target
    else:
        # A port nothing listens on (bound and released), for "policy not running".
        await server.start()
        upstream = server.target
        await server.stop()
    bridge = Bridge(test_config(upstream, **config))
    await bridge.start()
    if start_policy:
        assert await bridge.capabilities.plan(5.0) is not None
    stack = Stack(policy, server, bridge)
    try:
        yield stack
    finally:
        for client in stack.clients:
            await client.close()
        await bridge.stop()
        await server.stop()


def failure_actions(bridge: Bridge, stage: str, cause: str) -> float:
    """failure_actions_total{stage, cause} of a bridge in this process."""
    value = bridge.metrics.registry.get_sample_value(
        "milter_bridge_failure_actions_total", {"stage": stage, "cause": cause}
    )
    return value or 0.0
