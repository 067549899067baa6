"""Fault matrix: MTA connections that end in the middle of a message, at a high rate.

A policy that decides at RCPT and at end of message, with the envelope, the
headers and the body (tests/faults/replica.py). A third of the messages are
left mid-way by the MTA (after MAIL, after RCPT, in the middle of the headers or
of a body packet, after end of message, in turn), the connection ended with FIN
or with RST (over TCP; on a unix socket, which has no RST, by dropping what is
unsent). The bridge ends those sessions and their policy streams and nothing
else: every other message gets the policy's own verdict, no failure action, its
descriptors back at the baseline, its memory back near it, no ERROR line or
traceback.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from tests.faults.fleet import fds_settle, load
from tests.faults.record import Probe, Row, scale
from tests.faults.replicas import decided_by_the_policy, replica_fleet

DEADLINE = 5.0
SHARE = Fraction(1, 3)
POLICY_OUTCOMES = {"eom continue", "eom reject 550"}


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_mta_connections_ended_mid_message(
    tmp_path: Path, policy_path: tuple[str, ...], tcp: bool, how: str
) -> None:
    flags = (*policy_path, "--deadline", f"{DEADLINE:g}")
    async with replica_fleet(tmp_path, 1, *flags, tcp=tcp) as (_, bridge):
        assert decided_by_the_policy(await load(bridge, 30, recipients=2))
        baseline = await fds_settle(bridge, bridge.open_fds())
        before = Probe.take(bridge)
        count = scale(900)
        report = await load(
            bridge, count, concurrency=16, recipients=2, abandon_share=SHARE, abandon=how
        )
        assert report.ok, report.protocol_errors
        assert report.messages == count
        abandoned = {k: n for k, n in report.outcomes.items() if k.startswith("abandoned ")}
        assert sum(abandoned.values()) >= count // 3 - 1, report.outcomes
        assert all(k.endswith(f" {how}") for k in abandoned)
        # Every point the negotiation leaves: the policy needs no DATA or end of headers,
        # so the bridge asks the MTA not to send them; all the others are sent.
        points = {k.split()[1] for k in abandoned}
        assert points == {"mail", "rcpt", "header", "body", "eom"}, points
        assert set(report.outcomes) - set(abandoned) <= POLICY_OUTCOMES, report.outcomes
        assert report.latency.worst_answer_ms <= (DEADLINE + 1) * 1000, report.latency
        # The barrier: well-formed traffic afterwards is answered by the policy.
        after_load = await load(bridge, 50, recipients=2)
        assert decided_by_the_policy(after_load), after_load
        await fds_settle(bridge, baseline)
        after = Probe.take(bridge)
        transport = "TCP" if tcp else "unix socket"
        row = Row.build(
            f"MTA ends a third of the messages mid-way ({how.upper()}, {transport}; c=16)",
            [report],
            before,
            after,
            DEADLINE,
        )
        row.save().assert_settled()
        assert row.failure_actions == 0
        assert after.fds <= baseline + 1
        assert after.rss_kb <= before.rss_kb + 16 * 1024  # back near it: within 16 MB
    log = bridge.log()
    assert " ERROR " not in log
    assert "Traceback" not in log
