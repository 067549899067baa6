"""Fault matrix: the policy stopped (SIGSTOP) past the deadlines under load, then continued.

Every message still gets an answer within the end-of-message deadline plus 1 s:
the failure action while the policy is stopped, the policy's verdicts again once
it continues. The bridge stays up, its descriptors come back to their baseline,
and its log has one WARNING per failure and no ERROR or traceback.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.faults.fleet import answered_by_the_policy, fds_settle, fleet, load
from tests.faults.record import Probe, Row, scale

DEADLINE = 2.0  # seconds, every stage


async def test_policy_stopped_past_the_deadlines_then_continued(
    tmp_path: Path, policy_path: tuple[str, ...]
) -> None:
    async with fleet(tmp_path, *policy_path, "--deadline", f"{DEADLINE:g}") as (policy, bridge):
        warm = await load(bridge, 50)  # warm: the channel is up, the policy answers
        assert answered_by_the_policy(warm), warm
        baseline = await fds_settle(bridge, bridge.open_fds())
        before = Probe.take(bridge)

        policy.signal(signal.SIGSTOP)
        stopped = await load(bridge, 24)
        # Every message answered, with the failure action (tempfail by default),
        # within the deadline plus 1 s: never with nothing.
        assert stopped.ok, stopped.protocol_errors
        assert stopped.outcomes == {"eom tempfail": 24}, stopped.outcomes
        assert stopped.latency.messages == 24
        assert stopped.latency.worst_answer_ms <= (DEADLINE + 1) * 1000, stopped.latency

        policy.signal(signal.SIGCONT)
        after = await load(bridge, scale(50))  # the barrier: the policy decides again
        assert answered_by_the_policy(after), after

        assert bridge.proc is not None
        assert bridge.proc.poll() is None  # still serving
        fds = await fds_settle(bridge, baseline)
        assert fds <= baseline + 1, (baseline, fds)
        Row.build(
            "policy SIGSTOPped past the deadlines, then SIGCONT",
            [stopped, after],
            before,
            Probe.take(bridge),
            DEADLINE,
        ).save().assert_settled()
    log = bridge.log()
    assert " ERROR " not in log
    assert "Traceback" not in log
    failures = [line for line in log.splitlines() if "policy failure at end_of_message" in line]
    assert len(failures) == 24, failures[:3]
    assert all(" WARNING " in line and "no answer within 2s" in line for line in failures)
