"""A broken policy gets the configured failure action within the deadline; the next connection
is served normally. Bad MTA input closes only that connection, with a log line."""

from __future__ import annotations

import asyncio
import logging
import re
import struct

import grpc
import pytest

from milter_bridge.logs import PlainFormatter
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.session import FailureAction, Stage
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.policy import always_continue, verdict
from tests.runtime.stack import Stack, failure_actions, running
from tests.session import harness as h

CONNECT_AND_EOM = h.capabilities(
    connect=h.DECIDE,
    end_of_message=h.DECIDE,
    actions=pb.Actions(add_header=True),
)


async def one_message(stack: Stack) -> tuple[list[r.MilterReply], list[r.MilterReply]]:
    """A fresh connection: the answers to CONNECT and to end of message."""
    mta = await stack.negotiated()
    connect = await mta.command(*h.connect())
    if connect != [r.Continue()]:
        return connect, []
    return connect, await mta.command(*h.eom())


async def served_normally(stack: Stack) -> None:
    stack.policy.decide = always_continue
    stack.policy.refuse_streams = stack.policy.end_stream_after_start = False
    assert await one_message(stack) == ([r.Continue()], [r.Continue()])


def eom_answer(**eom: object) -> object:
    async def decide(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") != "end_of_message":
            return [verdict(request)]
        answer = pb.EndOfMessageResponse(verdict=pb.Verdict(action=pb.ACTION_ACCEPT), **eom)  # type: ignore[arg-type]
        return [pb.ProcessResponse(sequence=request.sequence, end_of_message=answer)]

    return decide


async def test_policy_not_running_at_start(caplog: pytest.LogCaptureFixture) -> None:
    async with running(CONNECT_AND_EOM, start_policy=False, describe_wait=0.05) as stack:
        # No capabilities: the minimum is negotiated and CONNECT gets the failure action.
        mta = await stack.connect()
        reply = await mta.negotiate()
        assert reply.actions == 0
        assert await mta.command(*h.connect()) == [r.TempFail()]
        assert "no policy capabilities known" in caplog.text
        # The policy comes up; once its capabilities are fetched, service is normal.
        await stack.server.start(stack.server.port)
        assert await stack.bridge.capabilities.plan(10.0) is not None
        await served_normally(stack)


@pytest.mark.parametrize("action", [FailureAction.ACCEPT, FailureAction.REJECT])
async def test_configured_failure_action(action: FailureAction) -> None:
    actions = dict.fromkeys(Stage, FailureAction.TEMPFAIL)
    actions[Stage.CONNECT] = action
    async with running(
        CONNECT_AND_EOM, start_policy=False, describe_wait=0.05, failure_actions=actions
    ) as stack:
        mta = await stack.negotiated()
        expected = r.Accept() if action is FailureAction.ACCEPT else r.Reject()
        assert await mta.command(*h.connect()) == [expected]


async def test_policy_killed_mid_message(caplog: pytest.LogCaptureFixture) -> None:
    async with running(CONNECT_AND_EOM) as stack:
        reached = asyncio.Event()

        async def die(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
            if request.WhichOneof("event") == "end_of_message":
                reached.set()
                await asyncio.Event().wait()  # until the server is killed
            return [verdict(request)]

        stack.policy.decide = die
        mta = await stack.negotiated()
        assert await mta.command(*h.connect()) == [r.Continue()]
        await mta.send(*h.eom())
        await reached.wait()
        await stack.server.stop()
        assert await mta.reply() == [r.TempFail()]
        # The log line names the connection and the queue id (fields; logs.py writes them).
        (line,) = [x for x in caplog.records if "policy failure at end_of_message" in x.message]
        assert re.search(
            r" conn=\S+ qid=QID1: policy failure at end_of_message", PlainFormatter().format(line)
        )
        await stack.server.start(stack.server.port)
        await served_normally(stack)


async def test_policy_slower_than_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def slow(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "end_of_message":
            await release.wait()
            return [verdict(request, pb.ACTION_ACCEPT)]
        return [verdict(request)]

    deadlines = dict.fromkeys(Stage, 5.0)
    deadlines[Stage.EOM] = 0.2
    async with running(CONNECT_AND_EOM, deadlines=deadlines, progress_interval=0.05) as stack:
        stack.policy.decide = slow
        _connect, eom = await one_message(stack)
        # TempFail, where the policy would have accepted: the deadline decided.
        assert eom[-1] == r.TempFail()
        assert all(x == r.Progress() for x in eom[:-1])
        assert "no answer within 0.2s" in caplog.text
        release.set()
        await served_normally(stack)


async def test_policy_ends_the_stream_early(caplog: pytest.LogCaptureFixture) -> None:
    async with running(CONNECT_AND_EOM) as stack:
        stack.policy.end_stream_after_start = True
        assert await one_message(stack) == ([r.TempFail()], [])
        assert "ended the stream without answering" in caplog.text
        await served_normally(stack)


async def test_policy_refuses_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    async with running(CONNECT_AND_EOM) as stack:
        stack.policy.refuse_streams = True
        stack.policy.described.clear()
        assert await one_message(stack) == ([r.TempFail()], [])
        assert "FAILED_PRECONDITION" in caplog.text
        # Counted as a refusal, even where grpc.aio reports it as INTERNAL (status.py).
        assert failure_actions(stack.bridge, "connect", "refused_stream") == 1
        await stack.policy.described.wait()  # the capabilities are fetched again at once
        await served_normally(stack)


@pytest.mark.parametrize(
    ("decide", "problem"),
    [
        (eom_answer(), None),  # control: a valid answer is accepted
        (
            eom_answer(
                modifications=[
                    pb.Modification(add_header=pb.AddHeader(name="X", value=b"a\r\nBcc: x"))
                ]
            ),
            "does not fold",
        ),
        (
            eom_answer(modifications=[pb.Modification(quarantine=pb.Quarantine(reason="x"))]),
            "SMFIF_QUARANTINE, which was not negotiated",
        ),
    ],
    ids=["valid", "crlf-in-header", "not-negotiated"],
)
async def test_invalid_modifications(
    decide: object, problem: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(CONNECT_AND_EOM) as stack:
        stack.policy.decide = decide  # type: ignore[assignment]
        _, eom = await one_message(stack)
        if problem is None:
            assert eom == [r.Accept()]
            return
        assert eom == [r.TempFail()]  # nothing of the invalid answer reached the MTA
        assert problem in caplog.text
        await served_normally(stack)


async def garbage(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    return [pb.ProcessResponse(sequence=request.sequence)]  # no verdict at all


async def wrong_sequence(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    return [verdict(pb.ProcessRequest(sequence=request.sequence + 7))]


async def unspecified_action(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    return [pb.ProcessResponse(sequence=request.sequence, verdict=pb.Verdict())]


@pytest.mark.parametrize(
    ("decide", "problem"),
    [
        (garbage, "holds no verdict"),
        (wrong_sequence, "but 2 (connect) awaits"),
        (unspecified_action, "not a valid Action"),
    ],
)
async def test_invalid_answers(
    decide: object, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(CONNECT_AND_EOM) as stack:
        stack.policy.decide = decide  # type: ignore[assignment]
        assert await one_message(stack) == ([r.TempFail()], [])
        assert problem in caplog.text
        await served_normally(stack)


@pytest.mark.parametrize(
    ("data", "log"),
    [
        (b"\0\0\0\x09Cclient\0", "inside a packet"),  # truncated, then EOF
        (struct.pack("!I", 0x7FFFFFFF) + b"B", "exceeds the limit"),
        (b"\0\0\0\1Z", "unknown command byte"),
        (b"\0\0\0\2Hx", "without terminating NUL"),
    ],
    ids=["truncated", "oversized", "unknown-command", "malformed"],
)
async def test_bad_mta_input_closes_only_that_connection(
    data: bytes, log: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(CONNECT_AND_EOM) as stack:
        bystander = await stack.negotiated()
        bad = await stack.negotiated()
        await bad.send_raw(data)
        if log == "inside a packet":
            bad.writer.write_eof()
        assert await bad.closed_by_peer()
        assert log in caplog.text  # logged before the socket was closed
        # The other connection goes on, and new ones are served.
        assert await bystander.command(*h.connect()) == [r.Continue()]
        await served_normally(stack)


async def test_silent_mta_connection_is_closed_after_the_idle_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(CONNECT_AND_EOM, mta_idle_timeout=0.3) as stack:
        silent = await stack.negotiated()
        assert await silent.closed_by_peer()  # the bridge closed it; nothing was sent
        assert "the MTA sent nothing for 0.3s: closing" in caplog.text
        await served_normally(stack)


async def test_connection_limit_refuses_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async with running(CONNECT_AND_EOM, max_connections=1) as stack:
        first = await stack.negotiated()
        second = await stack.connect()
        assert await second.closed_by_peer()
        assert "refused: 1 connections open" in caplog.text
        assert await first.command(*h.connect()) == [r.Continue()]


async def test_answer_for_skipped_command_stays_local() -> None:
    # A policy that only decides connect: an MTA offering no NO* flags still gets
    # local answers for the rest, and the policy sees nothing of them.
    async with running(h.capabilities(connect=h.DECIDE)) as stack:
        mta = await stack.connect()
        await mta.negotiate(protocol=0)  # v1 defaults: what an old MTA offers
        assert await mta.command(*h.connect()) == [r.Continue()]
        assert await mta.command(cmd.Helo(b"x")) == [r.Continue()]
        assert stack.policy.streams[0].events() == ["start", "connect"]


async def test_stream_reopened_when_unavailable_before_any_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="milter_bridge")
    async with running(CONNECT_AND_EOM) as stack:
        stack.policy.unavailable_streams = 1
        assert await one_message(stack) == ([r.Continue()], [r.Continue()])
        assert "opening it again" in caplog.text
        failed, replayed = stack.policy.streams
        assert failed.events() == ["start"]
        assert replayed.events() == ["start", "connect", "end_of_message"]  # replayed, then on
        assert (failed.requests[0].start.attempt, replayed.requests[0].start.attempt) == (0, 1)
        assert failed.requests[0].start.session_id == replayed.requests[0].start.session_id


async def test_unavailable_after_a_reply_is_not_retried() -> None:
    async with running(CONNECT_AND_EOM) as stack:
        mta = await stack.negotiated()
        assert await mta.command(*h.connect()) == [r.Continue()]
        await stack.server.stop()  # breaks the stream after its first reply was used
        assert await mta.command(*h.eom()) == [r.TempFail()]
        assert len(stack.policy.streams) == 1  # no second attempt


async def test_policy_that_stops_reading_its_stream(caplog: pytest.LogCaptureFixture) -> None:
    caps = h.capabilities(
        body=h.OBSERVE, end_of_message=h.DECIDE, body_delivery=pb.BODY_DELIVERY_STREAM
    )
    deadlines = dict.fromkeys(Stage, 5.0)
    deadlines[Stage.BODY] = 0.3
    async with running(caps, deadlines=deadlines) as stack:
        stack.policy.stop_reading = asyncio.Event()
        mta = await stack.negotiated()
        chunk = b"x" * 65000
        for _ in range(400):  # 26 MB: far more than gRPC's flow-control windows hold
            await mta.send(cmd.Body(chunk))
        # Observed events have no answer to fail: the stream is dropped, and the
        # message's end gets the failure action without another attempt.
        assert await mta.command(*h.eom()) == [r.TempFail()]
        assert "the policy took no request for 0.3s" in caplog.text
        # Connected but stuck: not unreachable.
        assert failure_actions(stack.bridge, "end_of_message", "timeout") == 1
        assert len(stack.policy.streams) == 1
        stack.policy.stop_reading.set()
        stack.policy.stop_reading = None
        await served_normally_eom(stack)


async def served_normally_eom(stack: Stack) -> None:
    mta = await stack.negotiated()
    assert await mta.command(*h.eom()) == [r.Continue()]


async def test_after_a_failure_the_rest_of_the_message_fails_at_once() -> None:
    release = asyncio.Event()
    calls: list[str] = []

    async def stuck_on_first_rcpt(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        calls.append(str(request.WhichOneof("event")))
        if calls.count("rcpt_to") == 1 and calls[-1] == "rcpt_to":
            await release.wait()
        return [verdict(request)]

    deadlines = dict.fromkeys(Stage, 5.0)
    deadlines[Stage.RCPT] = 0.2
    async with running(h.decide_everything(), deadlines=deadlines) as stack:
        stack.policy.decide = stuck_on_first_rcpt
        mta = await stack.negotiated()
        for commands in (h.connect(), h.mail()):
            assert await mta.command(*commands) == [r.Continue()]
        assert await mta.command(*h.rcpt()) == [r.TempFail()]  # the deadline
        # The same message: answered at once, the policy is not asked again.
        assert await mta.command(*h.rcpt(b"<second@x>")) == [r.TempFail()]
        assert await mta.command(*h.eom()) == [r.TempFail()]
        assert calls == ["connect", "mail_from", "rcpt_to"]
        release.set()
        # The next message tries the policy again, on a new stream.
        assert await mta.command(*h.mail()) == [r.Continue()]
        assert calls[-1] == "mail_from"
        assert stack.policy.streams[-1].events()[0] == "start"


async def test_failure_of_an_observe_only_stream_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(h.capabilities(helo=h.OBSERVE)) as stack:
        stack.policy.fail_streams_with = grpc.StatusCode.INTERNAL
        mta = await stack.negotiated()
        await mta.send(*h.helo())  # observed: nobody waits for an answer
        await mta.send(cmd.Quit())
        assert await mta.closed_by_peer()
        await stack.bridge.stop()  # the stream's close has finished by the time stop() returns
        assert "policy stream ended badly: INTERNAL: policy bug" in caplog.text
