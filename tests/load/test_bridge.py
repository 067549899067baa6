"""``milter-bridge load`` against the real bridge and a real SDK policy on port 0.

The policy is the issue's benchmark policy: at end of message it adds
``X-Bench: 1``, or rejects with 550 5.7.1 when the Subject carries the marker.
The marker goes to every k-th message, so the outcome counts are exact. The
abandoned messages go to a policy with a handler for every event, so that the
bridge asks the MTA for all of them and every point of abandon.py is reached,
over a unix socket and over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import pytest

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.load import LoadConfig, Shape, run
from milter_bridge.server.bridge import Bridge
from milter_policy import Context, Policy, PolicyServer


def bench_policy(*, rcpt_check: bool = False) -> Policy:
    # The end-of-message macros are asked for, and checked, to see the tool's D packets
    # reach a policy through the bridge.
    policy = Policy("bench", macros={"end_of_message": ["i", "{mail_addr}"]})

    if rcpt_check:

        @policy.rcpt_to
        def refuse_second(ctx: Context, address: str, args: list[str]) -> None:
            if address.startswith("<rcpt2@"):
                ctx.reject("no such user", code=550, xcode="5.1.1")

    @policy.end_of_message
    async def decide(ctx: Context) -> None:
        if ctx.macro("i") is None or ctx.macro("mail_addr") != "sender@example.test":
            ctx.tempfail("macros missing")
        elif any(b"REJECT" in value for value in ctx.header("Subject")):
            ctx.reject("marked", code=550, xcode="5.7.1")
        else:
            ctx.add_header("X-Bench", "1")
            ctx.accept()

    return policy


def every_event_policy() -> Policy:
    """The bench policy's verdicts, with a deciding handler for every event of a message."""
    policy = bench_policy()

    def go_on(ctx: Context, *args: object) -> None:
        """Continue: the MTA waits for every answer."""

    for event in ("mail_from", "rcpt_to", "data", "header", "end_of_headers", "body"):
        policy.on(event, go_on)
    return policy


@contextlib.asynccontextmanager
async def bridge_for(policy: Policy, listen: Listen) -> AsyncIterator[Bridge]:
    """A running bridge in front of ``policy``; ``bridge.address`` is the load tool's target."""
    server = PolicyServer(policy, "127.0.0.1:0")
    await server.start()
    bridge = Bridge(Config(listen=listen, upstream=f"127.0.0.1:{server.port}"))
    await bridge.start()
    assert await bridge.capabilities.plan(10.0) is not None
    try:
        yield bridge
    finally:
        await bridge.stop()
        await server.stop(1.0)


@contextlib.asynccontextmanager
async def bridged(policy: Policy) -> AsyncIterator[str]:
    """A bridge on 127.0.0.1 in front of ``policy``; yields its target for the load tool."""
    async with bridge_for(policy, Listen(ListenKind.INET, host="127.0.0.1", port=0)) as bridge:
        yield f"inet:127.0.0.1:{bridge.port}"


async def all_closed(bridge: Bridge, timeout: float = 10.0) -> None:
    """The barrier: every MTA connection the bridge had has ended on its side too."""
    deadline = time.monotonic() + timeout
    while bridge.connections:
        assert time.monotonic() < deadline, f"{bridge.connections} connections still open"
        await asyncio.sleep(0.01)


def shape(**overrides: object) -> Shape:
    return Shape(marker_share=Fraction(1, 5), **overrides)  # type: ignore[arg-type]


async def test_fifty_messages_one_per_connection() -> None:
    async with bridged(bench_policy()) as target:
        report = await run(LoadConfig(target, count=50, concurrency=4, shape=shape()))
    assert report.protocol_errors.total == 0, report.protocol_errors
    assert report.ok
    assert report.messages == 50
    assert report.connections == 50
    assert report.outcomes == {"eom accept": 40, "eom reject 550": 10}
    assert report.modifications == {"add_header": 40}
    assert report.latency.messages == 50
    assert 0 < report.latency.p50_ms <= report.latency.p99_ms <= report.latency.max_ms
    # Headers go without reply: OPTNEG and end of message are the answers awaited.
    assert report.latency.worst_answer_stage in ("optneg", "eom")
    assert report.latency.worst_answer_ms > 0
    (negotiated,) = report.negotiated
    # The bridge also sends an empty end-of-headers list (Sendmail's EOH/EOM quirk).
    assert negotiated.macros == {"eom": "i {mail_addr}", "eoh": ""}
    assert negotiated.connections == 50


async def test_several_messages_per_connection_and_recipients() -> None:
    async with bridged(bench_policy(rcpt_check=True)) as target:
        config = LoadConfig(
            target,
            count=40,
            concurrency=3,
            messages_per_connection=5,
            shape=shape(recipients=3, body_size=100_000, headers=20),
        )
        report = await run(config)
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"eom accept": 32, "eom reject 550": 8}
    assert report.refused_recipients == {"reject 550": 40}
    assert report.modifications == {"add_header": 32}
    # Every worker closes its connection after 5 messages; the last ones may be short.
    assert 8 <= report.connections <= 8 + 3


async def test_the_command_line_with_json() -> None:
    async with bridged(bench_policy()) as target:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "milter_bridge", "load", target, "--json", "--count", "50",
            "--concurrency", "4", "--marker-share", "0.2", "--messages-per-connection", "3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["ok"] is True
    assert report["messages"] == 50
    assert report["outcomes"] == {"eom accept": 40, "eom reject 550": 10}
    assert report["modifications"] == {"add_header": 40}
    assert report["protocol_errors"] == {"total": 0, "by_kind": {}, "first": []}
    assert report["latency"]["messages"] == 50
    assert "MAIL FROM" in report["latency"]["measures"]
    assert report["latency"]["worst_answer_stage"] in ("optneg", "eom")
    assert report["cpu_us_per_message"] > 0
    assert err == b""  # no progress line when stderr is not a terminal


POINTS = ("mail", "rcpt", "data", "header", "eoh", "body", "eom")


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("transport", ["unix", "inet"])
async def test_abandoned_messages_then_a_clean_run(
    transport: str, how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if transport == "unix":
        listen = Listen(ListenKind.UNIX, path=str(tmp_path / "bridge.sock"))
    else:
        listen = Listen(ListenKind.INET, host="127.0.0.1", port=0)
    async with bridge_for(every_event_policy(), listen) as bridge:
        config = LoadConfig(
            bridge.address,
            count=42,
            concurrency=4,
            messages_per_connection=3,
            shape=shape(body_size=100_000),  # 2 chunks: one answered, then half of the other
            abandon_share=Fraction(1, 2),
            abandon=how,
        )
        report = await run(config)
        await all_closed(bridge)
        # Then the same bridge, well-formed messages only: every one is answered.
        after = await run(
            LoadConfig(
                bridge.address, count=50, concurrency=4, messages_per_connection=5, shape=shape()
            )
        )
        await all_closed(bridge)
    assert report.ok, report.protocol_errors
    # The even messages (21) are abandoned, 3 at each point; the odd ones get their verdicts
    # (the marked ones are 9, 19, 29 and 39).
    abandoned = {f"abandoned {point} {how}": 3 for point in POINTS}
    assert report.outcomes == {"eom accept": 17, "eom reject 550": 4, **abandoned}
    assert report.modifications == {"add_header": 17}
    assert report.latency.messages == 21
    assert report.connections >= 21  # an abandoned connection is not used again
    assert after.ok, after.protocol_errors
    assert after.outcomes == {"eom accept": 40, "eom reject 550": 10}
    assert after.modifications == {"add_header": 40}
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
