"""Fault matrix: a partition between the bridge and the policy, under load.

A proxy between them stops forwarding without closing anything (no RST, no
FIN: the bridge's HTTP/2 connection looks up and nothing comes back), then
resumes. During the partition every message gets the failure action within its
deadline plus 1 s; once it heals, the policy decides again, with no message
left unanswered, the bridge's descriptors back at their baseline and no ERROR
line or traceback in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests.faults.fleet import (
    PolicyProcess,
    answered_by_the_policy,
    fds_settle,
    load,
    messages_ended,
    until_messages_ended,
)
from tests.faults.proxy import Proxy
from tests.faults.record import FAILURE_LINE, Probe, Row, scale
from tests.runtime.process import BridgeProcess

DEADLINE = 2.0


@contextlib.asynccontextmanager
async def partitionable(
    tmp_path: Path, *bridge_flags: str
) -> AsyncIterator[tuple[Proxy, BridgeProcess]]:
    policy = PolicyProcess(tmp_path / "policy.sock")
    await policy.start()
    proxy = Proxy(tmp_path / "proxy.sock", policy.socket_path)
    await proxy.start()
    bridge = BridgeProcess(tmp_path / "bridge.sock", proxy.target, *bridge_flags)
    try:
        await bridge.start()
        yield proxy, bridge
    finally:
        await bridge.stop()
        await proxy.stop()
        await policy.stop()


async def until_failures(bridge: BridgeProcess, at_least: int) -> None:
    """Readiness: the bridge has logged ``at_least`` failure actions."""
    async with asyncio.timeout(60):
        while bridge.log().count(FAILURE_LINE) < at_least:
            await asyncio.sleep(0.05)


async def test_partition_then_healed(tmp_path: Path, policy_path: tuple[str, ...]) -> None:
    async with partitionable(tmp_path, *policy_path, "--deadline", f"{DEADLINE:g}") as (
        proxy,
        bridge,
    ):
        assert answered_by_the_policy(await load(bridge, 30))
        before = Probe.take(bridge)
        count = scale(300)
        running = asyncio.create_task(load(bridge, count))
        await until_messages_ended(bridge, messages_ended(bridge) + count // 4)
        proxy.pause()
        # The partition lasts until 16 messages got the failure action (each after 2 s).
        await until_failures(bridge, 16)
        proxy.resume()
        report = await running
        assert report.ok, report.protocol_errors
        assert report.messages == count
        assert set(report.outcomes) <= {"eom continue", "eom reject 550", "eom tempfail"}
        assert report.outcomes.get("eom tempfail", 0) >= 16
        assert report.latency.worst_answer_ms <= (DEADLINE + 1) * 1000, report.latency
        # Healed: the policy decides every message again.
        after_load = await load(bridge, 50)
        assert answered_by_the_policy(after_load), after_load
        await fds_settle(bridge, before.fds)
        after = Probe.take(bridge)
        row = Row.build(
            "partition (proxy stops forwarding, then resumes; c=8)",
            [report],
            before,
            after,
            DEADLINE,
        )
        row.save().assert_settled()
        assert row.failure_actions == report.outcomes["eom tempfail"]
        assert after.fds <= before.fds + 1
    log = bridge.log()
    assert " ERROR " not in log
    assert "Traceback" not in log
