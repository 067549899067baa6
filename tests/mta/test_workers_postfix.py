"""``--workers 2`` through a real Postfix: every message gets its verdict, the SMTP
sessions spread over both workers, and a killed worker is replaced while the
other serves. (The conformance suite runs its verdicts through two workers too.)"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import smtplib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from milter_bridge.v1 import policy_pb2 as pb
from tests.mta.postfix import Postfix
from tests.mta.sink import SmtpSink
from tests.mta.test_postfix_smoke import policy_decision, send
from tests.prerequisites import require
from tests.runtime.policy import PolicyServer, ScriptedPolicy
from tests.runtime.process import BridgeProcess
from tests.runtime.workers import by_worker, one, ready, until
from tests.session import harness as h

MESSAGES = 24  # one SMTP session, so one milter connection, each
AT_ONCE = 6


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[BridgeProcess, Postfix, SmtpSink]]:
    require(root=True, commands=("postfix",))
    caps = h.eom_only()
    caps.actions.CopyFrom(pb.Actions(add_header=True))
    policy = ScriptedPolicy(caps)
    policy.decide = policy_decision
    server = PolicyServer(policy)
    await server.start()
    bridge = BridgeProcess(
        tmp_path / "bridge.sock",
        server.target,
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        tcp=True,
        env={"TMPDIR": str(tmp_path)},
    )
    sink = SmtpSink()
    await sink.start()
    # Postfix's own users must reach the instance: pytest's tmp_path is 0700.
    base = Path(tempfile.mkdtemp(prefix="milter-bridge-postfix-workers-"))
    base.chmod(0o755)
    postfix = Postfix(base, "", sink.port)
    try:
        await bridge.start()
        await until(lambda: _ready(bridge), "both workers ready")
        postfix.milter = bridge.target
        await postfix.start()
        yield bridge, postfix, sink
    finally:
        await postfix.stop()
        await bridge.stop()
        await sink.stop()
        await server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _ready(bridge: BridgeProcess) -> bool:
    return await ready(bridge) == 200


async def a_batch(postfix: Postfix, sink: SmtpSink, batch: str) -> None:
    """MESSAGES messages, AT_ONCE at a time; every fourth is refused by the policy with
    its custom reply, every other one arrives with the policy's header."""
    limit = asyncio.Semaphore(AT_ONCE)

    async def one_message(n: int) -> None:
        subject = f"{batch} {n}" + (" REJECTME" if n % 4 == 0 else "")
        async with limit:
            if n % 4:
                await asyncio.to_thread(send, postfix.port, subject)
                return
            with pytest.raises(smtplib.SMTPDataError) as refused:
                await asyncio.to_thread(send, postfix.port, subject)
            assert (refused.value.smtp_code, refused.value.smtp_error) == (
                550,
                b"5.7.1 policy says no",
            )

    await asyncio.gather(*(one_message(n) for n in range(MESSAGES)))
    accepted = {f"{batch} {n}" for n in range(MESSAGES) if n % 4}
    arrived = set()
    for _ in accepted:
        delivered = await sink.next()
        assert delivered.header("X-Policy") == ["checked"]
        arrived.add(delivered.header("Subject")[0])
    assert arrived == accepted
    # Barrier for "the refused went nowhere": a later marker arrives alone.
    await asyncio.to_thread(send, postfix.port, f"{batch} marker")
    assert (await sink.next()).header("Subject") == [f"{batch} marker"]
    assert sink.messages.empty()


async def test_verdicts_spread_and_a_killed_worker_through_postfix(
    two_workers: tuple[BridgeProcess, Postfix, SmtpSink],
) -> None:
    bridge, postfix, sink = two_workers
    await a_batch(postfix, sink, "first")
    counts = await by_worker(bridge)
    assert len(counts) == 2, counts
    assert min(counts.values()) > 0, counts  # both workers took SMTP sessions

    victim = min(counts)
    os.kill(victim, signal.SIGKILL)
    # The bridge goes on while the worker is replaced: the other takes every session.
    await a_batch(postfix, sink, "during")
    await until(lambda: _replaced(bridge, victim), "a new worker in the killed one's place")
    await until(lambda: _ready(bridge), "ready again")
    before = await by_worker(bridge)
    await a_batch(postfix, sink, "after")
    after = await by_worker(bridge)
    assert all(after[pid] > before[pid] for pid in after), (before, after)  # the new one too
    assert await one(bridge, "milter_bridge_worker_restarts_total") == 1
    assert await one(bridge, "milter_bridge_failure_actions_total") == 0
    assert "warning: milter" not in postfix.log()  # no milter connection failed


async def _replaced(bridge: BridgeProcess, gone: int) -> bool:
    counts = await by_worker(bridge)
    return len(counts) == 2 and gone not in counts
