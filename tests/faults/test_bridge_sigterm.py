"""Fault matrix: the bridge's own SIGTERM under load (a restart or a rolling update of it).

It stops taking connections at once (a new one is refused: the MTA applies its
own default), and the SMTP sessions in flight go on: their messages get the
policy's own verdicts as long as the grace period lasts. A message the policy
has not answered when the grace period ends gets the failure action then, not
at its (later) deadline. The bridge exits 0; its log has no ERROR line and no
traceback.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from milter_bridge.load import Report
from tests.faults.fleet import (
    answered_by_the_policy,
    fleet,
    load,
    metric,
    until_messages_ended,
)
from tests.faults.record import SHUTDOWN_LINE, Probe, Row, scale
from tests.runtime.process import BridgeProcess
from tests.runtime.workers import ready, until

REFUSED = "connection failed"  # the load tool's outcome for a refused connect()
# A connect() that the kernel queued just before the listener closed is then reset:
# the MTA sees the milter close at option negotiation. Refused too, a little later.
RESET_QUEUED = "optneg closed"


def refused_or_decided(report: Report, decided: set[str]) -> None:
    """Every message was decided (``decided``) or its connection was refused; no
    message was left without an answer once its session had begun."""
    assert set(report.outcomes) <= decided | {REFUSED, RESET_QUEUED}, report.outcomes
    assert report.protocol_errors.total == report.outcomes.get(RESET_QUEUED, 0)
    assert report.protocol_errors.by_kind.keys() <= {"closed"}


WORKERS = ["1", "2"]


def named(row: str, workers: str) -> str:
    """With workers, the row's descriptors and memory are the supervisor's."""
    return row if workers == "1" else f"{row}, {workers} workers (fds, RSS: the supervisor's)"


async def all_ready(bridge: BridgeProcess, workers: str) -> None:
    """Barrier: the supervisor's socket accepts before its workers run; /readyz says
    when every worker knows the policy."""
    if workers != "1":
        await until(lambda: _ready(bridge), "every worker ready")


async def _ready(bridge: BridgeProcess) -> bool:
    return await ready(bridge) == 200


@pytest.mark.parametrize("workers", WORKERS)
async def test_in_flight_sessions_finish_with_the_policys_verdicts(
    tmp_path: Path, policy_path: tuple[str, ...], workers: str
) -> None:
    flags = (*policy_path, "--deadline", "5", "--metrics-listen", "127.0.0.1:0")
    flags += ("--workers", workers)
    async with fleet(tmp_path, *flags) as (_, bridge):
        await all_ready(bridge, workers)
        before = Probe.take(bridge)
        count = scale(400)
        # Four messages per SMTP session: sessions in flight at SIGTERM have more to send.
        running = asyncio.create_task(load(bridge, count, per_connection=4))
        await until_messages_ended(bridge, count // 4)
        bridge.signal(signal.SIGTERM)
        report = await running
        assert await bridge.wait() == 0
        refused_or_decided(report, {"eom continue", "eom reject 550"})
        assert report.outcomes.get(REFUSED, 0) > 0  # new connections were refused
        Row.build(
            named("bridge SIGTERMed under load (c=8, 4 messages per session)", workers),
            [report],
            before,
            Probe.gone(bridge),
            5.0,
        ).save()
    log = bridge.log()
    # Sessions in flight went on after the signal, their messages decided by the policy.
    after_signal = log.partition("signal received")[2]
    assert after_signal.count(" end of message: ") > 0
    assert "draining" in log
    assert " ERROR " not in log
    assert "Traceback" not in log
    assert "policy failure" not in log


@pytest.mark.parametrize("workers", WORKERS)
async def test_after_the_grace_period_the_failure_action(
    tmp_path: Path, policy_path: tuple[str, ...], workers: str
) -> None:
    grace, deadline = 1.0, 20.0
    flags = (
        *policy_path,
        "--deadline",
        f"{deadline:g}",
        "--grace-period",
        f"{grace:g}",
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        workers,
    )
    async with fleet(tmp_path, *flags) as (policy, bridge):
        await all_ready(bridge, workers)
        # Warm: the bridge knows the policy's capabilities before it stops answering.
        assert answered_by_the_policy(await load(bridge, 10))
        before = Probe.take(bridge)
        policy.signal(signal.SIGSTOP)  # in-flight messages wait for it
        running = asyncio.create_task(load(bridge, 8))
        # Barrier: all eight end-of-message events have gone to the (stopped) policy.
        async with asyncio.timeout(30):
            while (
                await metric(bridge, "milter_bridge_events_sent_total", event="end_of_message") < 8
            ):
                await asyncio.sleep(0.05)
        bridge.signal(signal.SIGTERM)
        report = await running
        policy.signal(signal.SIGCONT)
        assert await bridge.wait() == 0
        assert report.ok, report.protocol_errors
        assert report.outcomes == {"eom tempfail": 8}
        # Answered when the grace period ended, long before the deadline.
        assert report.latency.worst_answer_ms <= (grace + 1 + 1) * 1000, report.latency
        log = bridge.log()
        assert log.count(SHUTDOWN_LINE) == 8
        Row.build(
            named(
                f"bridge SIGTERMed, policy stopped (grace {grace:g} s, deadline {deadline:g} s)",
                workers,
            ),
            [report],
            before,
            Probe.gone(bridge),
            grace,
        ).save()
    assert " ERROR " not in log
    assert "Traceback" not in log
