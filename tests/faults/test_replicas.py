"""Fault matrix: three replicas of a policy that decides at RCPT and at end of message,
under load: one killed (SIGKILL), and a rolling update (each replica in turn gets
SIGTERM, drains, and is started again).

Every message is answered within its stage's deadline plus 1 s, by the policy or
with the failure action, never with nothing; with another replica up, a rolling
update costs no failure action. Afterwards the replicas decide every message, a
restarted replica takes sessions again, the bridge's descriptors are back at the
baseline, and its log has no ERROR line and no traceback.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import pytest

from milter_bridge.load import Report
from tests.faults.conftest import SHARED
from tests.faults.fleet import fds_settle, load, messages_ended, metric, until_messages_ended
from tests.faults.record import Probe, Row, scale, scaled_timeout
from tests.faults.replicas import Replica, decided_by_the_policy, replica_fleet
from tests.runtime.process import BridgeProcess

DEADLINE = 5.0
POLICY_OUTCOMES = {"eom continue", "eom reject 550"}
FAILED_OUTCOMES = {"eom tempfail", "rcpt tempfail"}  # the failure action (tempfail) decided


def answered(report: Report, count: int) -> None:
    """Every message answered, by the replicas or with the failure action, in time."""
    assert report.ok, report.protocol_errors
    assert report.messages == count
    assert set(report.outcomes) <= POLICY_OUTCOMES | FAILED_OUTCOMES, report.outcomes
    assert set(report.refused_recipients) <= {"reject 550", "tempfail"}
    assert report.latency.worst_answer_ms <= (DEADLINE + 1) * 1000, report.latency


async def decided(bridge: BridgeProcess, count: int) -> Report:
    return await load(bridge, count, recipients=2)


async def takes_sessions_again(replica: Replica, bridge: BridgeProcess) -> None:
    """Readiness after a restart: the new process decides messages again."""
    served = replica.log().count(" decides ")
    async with asyncio.timeout(60):
        while replica.log().count(" decides ") == served:
            report = await decided(bridge, 6)
            assert decided_by_the_policy(report), (report.outcomes, report.refused_recipients)


async def settled_row(
    case: str, report: Report, bridge: BridgeProcess, restarted: list[Replica], before: Probe
) -> Row:
    """After the fault: each restarted replica decides again and the bridge's descriptors
    settle; the case's row, saved, with the bridge back at its baseline."""
    for replica in restarted:
        await takes_sessions_again(replica, bridge)
    await fds_settle(bridge, before.fds)
    row = Row.build(case, [report], before, Probe.take(bridge), DEADLINE)
    row.save().assert_settled()
    return row


def clean(bridge: BridgeProcess) -> None:
    log = bridge.log()
    assert " ERROR " not in log
    assert "Traceback" not in log
    failures = [line for line in log.splitlines() if " policy failure at " in line]
    assert all(" WARNING " in line for line in failures)


async def test_one_of_three_replicas_killed(tmp_path: Path, policy_path: tuple[str, ...]) -> None:
    flags = (*policy_path, "--deadline", f"{DEADLINE:g}")
    async with replica_fleet(tmp_path, 3, *flags) as (replicas, bridge):
        assert decided_by_the_policy(await decided(bridge, 30))
        before = Probe.take(bridge)
        count = scale(400)
        running = asyncio.create_task(decided(bridge, count))
        await until_messages_ended(bridge, messages_ended(bridge) + count // 4)
        replicas[1].signal(signal.SIGKILL)
        report = await running
        answered(report, count)
        await replicas[1].restart()
        await takes_sessions_again(replicas[1], bridge)
        check = await decided(bridge, 60)
        assert decided_by_the_policy(check), check
        await fds_settle(bridge, before.fds)
        after = Probe.take(bridge)
        row = Row.build("one of three replicas SIGKILLed (c=8)", [report], before, after, DEADLINE)
        row.save().assert_settled()
        if policy_path == SHARED:
            # Its sessions replayed elsewhere, answered events as decided: none lost.
            assert row.failure_actions == 0
            assert decided_by_the_policy(report), report.outcomes
        assert after.fds <= before.fds + 1
    clean(bridge)


async def test_rolling_update_costs_no_failure_action(
    tmp_path: Path, policy_path: tuple[str, ...]
) -> None:
    flags = (*policy_path, "--deadline", f"{DEADLINE:g}")
    async with replica_fleet(tmp_path, 3, *flags) as (replicas, bridge):
        assert decided_by_the_policy(await decided(bridge, 30))
        before = Probe.take(bridge)
        count = scale(600)
        running = asyncio.create_task(decided(bridge, count))
        for replica in replicas:  # one at a time, as a Deployment's rolling update
            await until_messages_ended(bridge, messages_ended(bridge) + count // 6)
            replica.signal(signal.SIGTERM)
            assert await replica.exited() == 0
            await replica.restart()
        report = await running
        answered(report, count)
        case = "rolling update: each of three replicas SIGTERMed and restarted (c=8)"
        row = await settled_row(case, report, bridge, replicas, before)
        assert decided_by_the_policy(report), report.outcomes
        assert row.failure_actions == 0
        assert row.fds[1] <= row.fds[0] + 1
    clean(bridge)


@pytest.mark.timeout(scaled_timeout(120))  # about 50 messages a second: 3 min at scale 10
@pytest.mark.parametrize(
    ("count", "outage", "case"),
    [
        (3, 2.0, "each of three replicas SIGKILLed mid-message and restarted 2 s later (c=16)"),
        (1, 0.0, "only replica SIGKILLed mid-message, restarted at once (c=16)"),
    ],
)
async def test_replicas_killed_mid_message_cost_no_failure_action(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int, outage: float, case: str
) -> None:
    """Shared streams only (a Process stream cannot move a session that had answers).
    Replicas take 300 ms at end of message, so that at any time most of the load's
    sessions wait there with their RCPT already decided; each replica in turn is
    SIGKILLed and started again after ``outage`` seconds. Every session on a killed
    replica is replayed, on another replica or on the restarted one, within its
    deadline: not one failure action, every message the policy's."""
    monkeypatch.setenv("FAULTS_PATH", "shared-streams")
    flags = (*SHARED, "--deadline", f"{DEADLINE:g}")
    async with replica_fleet(tmp_path, count, *flags, eom_delay=0.3) as (replicas, bridge):
        assert decided_by_the_policy(await decided(bridge, 30))
        before = Probe.take(bridge)
        # About 50 messages a second: enough for a round of a kill, the outage and the
        # restart per replica, each begun after a ninth of the load.
        messages = scale(900 if count > 1 else 300)
        running = asyncio.create_task(load(bridge, messages, concurrency=16, recipients=2))
        for replica in replicas:
            await until_messages_ended(bridge, messages_ended(bridge) + messages // 9)
            replica.signal(signal.SIGKILL)
            await replica.exited()
            await asyncio.sleep(outage)  # the fault's shape: down this long
            await replica.restart()
        report = await running
        answered(report, messages)
        row = await settled_row(case, report, bridge, replicas, before)
        assert row.failure_actions == 0
        assert decided_by_the_policy(report), (report.outcomes, report.refused_recipients)
        assert "replaying the session on another" in bridge.log()
    clean(bridge)


async def test_sessions_spread_over_three_replicas(
    tmp_path: Path, policy_path: tuple[str, ...]
) -> None:
    """Each replica takes a third of the sessions, within 15 %, as the bridge's metric
    milter_bridge_upstream_replica_sessions_total shows per replica."""
    flags = (*policy_path, "--metrics-listen", "127.0.0.1:0")
    async with replica_fleet(tmp_path, 3, *flags) as (replicas, bridge):
        name = "milter_bridge_upstream_replica_sessions_total"
        host = socket.gethostname()
        before = [await metric(bridge, name, replica=f"{host}:{r.port}") for r in replicas]
        count = 300
        assert decided_by_the_policy(await load(bridge, count, recipients=2))
        after = [await metric(bridge, name, replica=f"{host}:{r.port}") for r in replicas]
        shares = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(shares) == count, shares
        assert all(abs(share - count / 3) <= 0.15 * count / 3 for share in shares), shares
