"""Upstream targets as grpc takes them, with round_robin over several replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc.aio
import pytest

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.protocol import replies as r
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2_grpc
from tests.runtime.mta_client import MtaClient
from tests.runtime.policy import PolicyServer, ScriptedPolicy
from tests.session import harness as h

CAPS = h.capabilities(connect=h.DECIDE)


async def sessions(bridge: Bridge, n: int) -> None:
    for _ in range(n):
        mta = await MtaClient.connect(bridge.port)
        await mta.negotiate()
        assert await mta.command(*h.connect()) == [r.Continue()]
        await mta.close()


def bridge_for(upstream: str) -> Bridge:
    listen = Listen(ListenKind.INET, host="127.0.0.1", port=0)
    return Bridge(Config(listen=listen, upstream=upstream))


async def test_round_robin_over_an_address_list() -> None:
    replicas = [PolicyServer(ScriptedPolicy(CAPS)) for _ in range(2)]
    for replica in replicas:
        await replica.start()
    bridge = bridge_for("ipv4:" + ",".join(f"127.0.0.1:{x.port}" for x in replicas))
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        await sessions(bridge, 20)
        counts = [len(x.policy.streams) for x in replicas]
        assert sum(counts) == 20
        assert min(counts) >= 4, counts  # spread over both, not pinned to one
    finally:
        await bridge.stop()
        for replica in replicas:
            await replica.stop()


async def test_unix_socket_target(tmp_path: Path) -> None:
    policy = ScriptedPolicy(CAPS)
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, server)
    path = tmp_path / "policy.sock"
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    bridge = bridge_for(f"unix:{path}")
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        await sessions(bridge, 2)
        assert len(policy.streams) == 2
    finally:
        await bridge.stop()
        await server.stop(0)


async def test_listen_on_ipv6_loopback() -> None:
    server = PolicyServer(ScriptedPolicy(CAPS))
    await server.start()
    bridge = Bridge(
        Config(listen=Listen(ListenKind.INET6, host="::1", port=0), upstream=server.target)
    )
    await bridge.start()
    try:
        assert bridge.address.startswith("inet6:[::1]:")
        reader, writer = await asyncio.open_connection("::1", bridge.port)
        mta = MtaClient(reader, writer)
        await mta.negotiate()
        assert await mta.command(*h.connect()) == [r.Continue()]
        await mta.close()
    finally:
        await bridge.stop()
        await server.stop()


async def test_load_spreads_over_three_replicas_and_survives_one_dying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replicas = [PolicyServer(ScriptedPolicy(CAPS)) for _ in range(3)]
    for replica in replicas:
        await replica.start()
    bridge = bridge_for("ipv4:" + ",".join(f"127.0.0.1:{x.port}" for x in replicas))
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        await sessions(bridge, 30)
        counts = [len(x.policy.streams) for x in replicas]
        assert min(counts) >= 5, counts  # every replica took a share
        await replicas[0].stop()  # one replica dies
        before = [len(x.policy.streams) for x in replicas]
        await sessions(bridge, 20)  # each session asserts its CONNECT got Continue
        after = [len(x.policy.streams) for x in replicas]
        assert after[0] == before[0]  # nothing more went to the dead one
        assert sum(after) - sum(before) == 20
        assert "policy failure" not in caplog.text  # no failure action anywhere
    finally:
        await bridge.stop()
        for replica in replicas:
            await replica.stop()
