"""Fault matrix: the only policy replica killed (SIGKILL) under load and started again,
once within the deadline and once after it.

Within the deadline, the conversations cut off are opened again on the new
replica and what was sent replayed (StreamStart.attempt): every message gets the
policy's own verdict. After it, the messages of the outage get the failure
action within the deadline plus 1 s, and the policy decides again once it is back.
Never a message without an answer, the bridge up, no ERROR line or traceback.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from milter_bridge.load import Report
from tests.faults.fleet import (
    answered_by_the_policy,
    fds_settle,
    fleet,
    load,
    messages_ended,
    until_messages_ended,
)
from tests.faults.record import Probe, Row, scale
from tests.runtime.process import BridgeProcess

DEADLINE = 5.0
COUNT = 300


def answered(report: Report, count: int) -> None:
    """Every message answered, by the policy or with the failure action, in time."""
    assert report.ok, report.protocol_errors
    assert report.messages == count
    assert report.latency.messages == count
    assert set(report.outcomes) <= {"eom continue", "eom reject 550", "eom tempfail"}
    assert report.latency.worst_answer_ms <= (DEADLINE + 1) * 1000, report.latency


async def until_the_policy_decides(bridge: BridgeProcess) -> None:
    """Readiness after a restart: a short load answered wholly by the policy."""
    async with asyncio.timeout(60):
        while not answered_by_the_policy(await load(bridge, 10, concurrency=2)):
            pass


async def test_only_replica_killed_and_back_within_the_deadline(
    tmp_path: Path, policy_path: tuple[str, ...]
) -> None:
    async with fleet(tmp_path, *policy_path, "--deadline", f"{DEADLINE:g}") as (policy, bridge):
        assert answered_by_the_policy(await load(bridge, 20))
        baseline = await fds_settle(bridge, bridge.open_fds())
        before = Probe.take(bridge)
        count = scale(COUNT)
        running = asyncio.create_task(load(bridge, count))
        # The fault lands in the middle of the load: once 50 of its messages have ended.
        await until_messages_ended(bridge, messages_ended(bridge) + 50)
        policy.signal(signal.SIGKILL)
        await policy.restart()
        report = await running
        answered(report, count)
        # Cut-off conversations were replayed on the new replica: no failure action.
        assert "eom tempfail" not in report.outcomes, report.outcomes
        assert answered_by_the_policy(await load(bridge, 20))
        assert await fds_settle(bridge, baseline) <= baseline + 1
        Row.build(
            "only replica SIGKILLed, restarted at once (c=8)",
            [report],
            before,
            Probe.take(bridge),
            DEADLINE,
        ).save().assert_settled()
    assert " ERROR " not in bridge.log()
    assert "Traceback" not in bridge.log()


async def test_only_replica_killed_and_back_after_the_deadline(
    tmp_path: Path, policy_path: tuple[str, ...]
) -> None:
    async with fleet(tmp_path, *policy_path, "--deadline", f"{DEADLINE:g}") as (policy, bridge):
        assert answered_by_the_policy(await load(bridge, 20))
        baseline = await fds_settle(bridge, bridge.open_fds())
        before = Probe.take(bridge)
        policy.signal(signal.SIGKILL)
        outage = await load(bridge, 16)  # the policy is down for all of these
        answered(outage, 16)
        assert outage.outcomes == {"eom tempfail": 16}
        await policy.restart()
        await until_the_policy_decides(bridge)
        after = await load(bridge, scale(50))
        assert answered_by_the_policy(after), after
        assert await fds_settle(bridge, baseline) <= baseline + 1
        Row.build(
            "only replica SIGKILLed, restarted after the outage",
            [outage, after],
            before,
            Probe.take(bridge),
            DEADLINE,
        ).save().assert_settled()
    log = bridge.log()
    assert " ERROR " not in log
    assert "Traceback" not in log
    failures = [line for line in log.splitlines() if "policy failure at end_of_message" in line]
    assert len(failures) >= 16
    assert all(" WARNING " in line for line in failures)
