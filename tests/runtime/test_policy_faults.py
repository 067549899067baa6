"""Faults of the policy, through the running bridge: after a failure nothing more of that
message reaches any stream, whatever the read split, and every stream begins with `start`;
a reply that is not a ProcessResponse, a policy that is down, a policy that floods progress
-- each stage still gets its answer within its own deadline, with progress at end of message."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import encode_all
from milter_bridge.protocol import replies as r
from milter_bridge.server.bridge import Bridge
from milter_bridge.server.connection import PROGRESS_GAP
from milter_bridge.session import FailureAction, Stage
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.mta_client import MtaClient
from tests.runtime.policy import RawPolicyServer, ScriptedPolicy, verdict
from tests.runtime.stack import failure_actions
from tests.runtime.stack import test_config as bridge_config
from tests.session import harness as h

# The MTA's answer must come within the stage's own deadline; this bounds the wait
# only so that a bridge that waits for another stage's deadline fails clearly.
LONG = 3600.0
NOT_A_PROCESS_RESPONSE = b"\xff\xff\xff\xff"


@dataclass
class Setup:
    policy: ScriptedPolicy
    bridge: Bridge
    clients: list[MtaClient] = field(default_factory=list)

    async def mta(self) -> MtaClient:
        """A connection whose option negotiation is done."""
        mta = await MtaClient.connect(self.bridge.port)
        self.clients.append(mta)
        await mta.negotiate()
        return mta


@contextlib.asynccontextmanager
async def bridge_with(
    caps: pb.Capabilities, *, policy_up: bool = True, **config: object
) -> AsyncIterator[Setup]:
    """A bridge that knows the policy's capabilities; with ``policy_up`` False the
    policy is gone once they were fetched."""
    policy = ScriptedPolicy(caps)
    server = RawPolicyServer(policy)
    await server.start()
    setup = Setup(policy, Bridge(bridge_config(server.target, **config)))
    await setup.bridge.start()
    try:
        assert await setup.bridge.capabilities.plan(5.0) is not None
        if not policy_up:
            await server.stop()
        yield setup
    finally:
        for client in setup.clients:
            await client.close()
        await setup.bridge.stop()
        await server.stop()


async def send_split(mta: MtaClient, commands: list[cmd.MtaCommand], split: str) -> None:
    data = encode_all(commands)
    if split == "one-write":
        pieces = [data]
    elif split == "per-packet":
        pieces = [encode_all([c]) for c in commands]
    else:
        pieces = [data[i : i + 1] for i in range(len(data))]
    for piece in pieces:
        await mta.send_raw(piece)


def assert_streams_begin_with_start(policy: ScriptedPolicy) -> None:
    for stream in policy.streams:
        assert stream.events()[:1] == ["start"], stream.events()


def no_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR lines and tracebacks: none for a fault the bridge handles."""
    gc.collect()  # "Task was destroyed but it is pending!" is logged when one is collected
    return [
        rec.getMessage()
        for rec in caplog.records
        if rec.levelno >= logging.ERROR or rec.exc_info is not None
    ]


def observed_content(eom: int) -> pb.Capabilities:
    """Decided: connect, mail, rcpt (and end of message with DECIDE); the content is only
    observed, so the MTA sends it without waiting, in whatever pieces the bridge reads."""
    return h.capabilities(
        h.OBSERVE, connect=h.DECIDE, mail_from=h.DECIDE, rcpt_to=h.DECIDE, end_of_message=eom
    )


async def invalid_at_rcpt(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    if request.HasField("rcpt_to"):
        return [pb.ProcessResponse(sequence=request.sequence)]  # no verdict: invalid
    return [verdict(request)]


SPLITS = ["one-write", "per-packet", "per-byte"]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("eom", [h.DECIDE, h.OBSERVE], ids=["eom-decided", "eom-observed"])
async def test_after_a_failure_at_rcpt_no_request_of_the_message_reaches_a_stream(
    split: str, eom: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "milter_bridge")
    async with bridge_with(observed_content(eom)) as setup:
        policy, bridge = setup.policy, setup.bridge
        policy.decide = invalid_at_rcpt
        mta = await setup.mta()
        assert await mta.command(*h.connect()) == [r.Continue()]
        assert await mta.command(*h.mail()) == [r.Continue()]
        assert await mta.command(*h.rcpt()) == [r.TempFail()]  # the failure action
        assert await mta.command(*h.rcpt(b"<second@x>")) == [r.TempFail()]  # at once
        await send_split(mta, [*h.content(), *h.eom()], split)
        # End of message: its failure action, or the bridge's own answer when observed.
        assert await mta.reply() == [r.TempFail() if eom == h.DECIDE else r.Continue()]
        if eom == h.DECIDE:  # its log line: the policy was not asked, it took no time
            (ended,) = [x for x in caplog.records if x.getMessage().startswith("end of message")]
            assert ended.getMessage().startswith("end of message: tempfail (policy 0.0 ms"), ended
        # The next message is the barrier: its MAIL is answered by the policy.
        await send_split(mta, [cmd.Abort(), *h.mail()], split)
        assert await mta.reply() == [r.Continue()]
        first, second = policy.streams
        assert first.events() == ["start", "connect", "mail_from", "rcpt_to"]
        assert second.events() == ["start", "mail_from"]
        assert_streams_begin_with_start(policy)
        assert failure_actions(bridge, "rcpt_to", "invalid_reply") == 2  # both recipients
        assert no_errors(caplog) == []


@pytest.mark.parametrize("split", SPLITS)
async def test_a_message_aborted_after_a_failure_sends_no_abort(split: str) -> None:
    # The client gives up in the middle of DATA (RSET): nothing of the failed
    # message, its ABORT included, may reach a stream.
    async with bridge_with(observed_content(h.DECIDE)) as setup:
        setup.policy.decide = invalid_at_rcpt
        mta = await setup.mta()
        assert await mta.command(*h.connect()) == [r.Continue()]
        assert await mta.command(*h.mail()) == [r.Continue()]
        assert await mta.command(*h.rcpt()) == [r.TempFail()]
        await send_split(mta, [*h.content(), cmd.Abort(), *h.mail()], split)
        assert await mta.reply() == [r.Continue()]  # the next message's MAIL
        first, second = setup.policy.streams
        assert first.events() == ["start", "connect", "mail_from", "rcpt_to"]
        assert second.events() == ["start", "mail_from"]
        assert_streams_begin_with_start(setup.policy)


@pytest.mark.parametrize("split", ["one-write", "per-packet"])
async def test_failure_action_continue_at_data_sends_no_more_of_the_message(split: str) -> None:
    caps = h.capabilities(h.OBSERVE, mail_from=h.DECIDE, data=h.DECIDE, end_of_message=h.DECIDE)
    actions = dict.fromkeys(Stage, FailureAction.TEMPFAIL)
    actions[Stage.DATA] = FailureAction.CONTINUE

    async def refuse_data(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.HasField("data"):
            return [pb.ProcessResponse(sequence=request.sequence + 5, verdict=pb.Verdict())]
        return [verdict(request)]

    async with bridge_with(caps, failure_actions=actions) as setup:
        policy = setup.policy
        policy.decide = refuse_data
        mta = await setup.mta()
        await mta.send(*h.connect())
        assert await mta.command(*h.mail()) == [r.Continue()]
        await mta.send(*h.rcpt())
        assert await mta.command(*h.content()[:2]) == [r.Continue()]  # DATA: continue
        await send_split(mta, h.content()[2:] + h.eom(), split)
        assert await mta.reply() == [r.TempFail()]  # end of message: its own failure action
        assert await mta.command(cmd.Abort(), *h.mail()) == [r.Continue()]
        first, second = policy.streams
        assert first.events() == ["start", "connect", "mail_from", "rcpt_to", "data"]
        assert second.events() == ["start", "mail_from"]
        assert_streams_begin_with_start(policy)


async def test_a_reply_that_is_not_a_process_response_gets_the_failure_action(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def garbage(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        return [NOT_A_PROCESS_RESPONSE]  # type: ignore[list-item]

    async def fine(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        return [verdict(request)]

    caps = h.capabilities(connect=h.DECIDE)
    async with bridge_with(caps) as setup:
        setup.policy.decide = garbage
        mta = await setup.mta()
        assert await mta.command(*h.connect()) == [r.TempFail()]
        assert failure_actions(setup.bridge, "connect", "invalid_reply") == 1
        warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        assert len([w for w in warnings if "not a ProcessResponse" in w]) == 1, warnings
        assert no_errors(caplog) == []
        setup.policy.decide = fine
        assert await (await setup.mta()).command(*h.connect()) == [r.Continue()]


@pytest.mark.parametrize("stage", [Stage.RCPT, Stage.MAIL])
async def test_with_the_policy_down_each_stage_is_answered_by_its_own_deadline(
    stage: Stage, caplog: pytest.LogCaptureFixture
) -> None:
    # Opening the stream counts against the stage's deadline, not the connect stage's.
    caps = h.capabilities(**{stage.value: h.DECIDE})
    deadlines = dict.fromkeys(Stage, LONG)
    deadlines[stage] = 0.3
    async with bridge_with(caps, policy_up=False, deadlines=deadlines) as setup:
        mta = await setup.mta()
        commands = h.mail() if stage is Stage.MAIL else h.rcpt()
        replies = await asyncio.wait_for(mta.command(*commands), LONG / 100)
        assert replies == [r.TempFail()]
        # Down, not stuck: the channel is not connected (a stuck policy is a timeout,
        # test_failures.py::test_policy_that_stops_reading_its_stream).
        assert failure_actions(setup.bridge, stage.value, "unreachable") == 1
        assert "the policy could not be reached within 0.3s" in caplog.text
    assert no_errors(caplog) == []


async def test_end_of_message_gets_progress_while_the_policy_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The request cannot even be handed over; the MTA must still hear from the
    # bridge every progress interval, until the end-of-message deadline.
    caps = h.capabilities(end_of_message=h.DECIDE)
    deadlines = dict.fromkeys(Stage, LONG)
    deadlines[Stage.EOM] = 2.0
    async with bridge_with(
        caps, policy_up=False, deadlines=deadlines, progress_interval=0.2
    ) as setup:
        mta = await setup.mta()
        replies = await asyncio.wait_for(mta.command(*h.eom()), LONG / 100)
        assert replies[-1] == r.TempFail()
        assert replies[:-1]
        assert set(replies[:-1]) == {r.Progress()}
    assert no_errors(caplog) == []


async def test_progress_from_the_policy_is_forwarded_at_most_once_a_second() -> None:
    floods = 2000

    async def flood(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        progress = pb.ProcessResponse(sequence=request.sequence, progress=pb.Progress())
        return [progress] * floods + [verdict(request, pb.ACTION_ACCEPT)]

    caps = h.capabilities(end_of_message=h.DECIDE)
    async with bridge_with(caps) as setup:
        setup.policy.decide = flood
        mta = await setup.mta()
        loop = asyncio.get_running_loop()
        began = loop.time()
        replies = await mta.command(*h.eom())
        elapsed = loop.time() - began
        assert replies[-1] == r.Accept()
        progress = replies[:-1]
        assert set(progress) <= {r.Progress()}
        # The bridge's clock is this loop's: within ``elapsed`` it may send one at
        # once and one per PROGRESS_GAP after it.
        assert len(progress) <= 1 + math.ceil(elapsed / PROGRESS_GAP), (len(progress), elapsed)
