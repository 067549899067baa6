"""The running bridge between an MTA client on a real socket and a real grpc.aio policy."""

from __future__ import annotations

import asyncio

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.policy import verdict
from tests.runtime.stack import running
from tests.session import harness as h

M = pb.Modification


async def test_every_event_reaches_the_policy_with_its_macros() -> None:
    async with running(h.decide_everything()) as stack:
        mta = await stack.negotiated()
        for commands, kind, macros in h.every_event():
            assert await mta.command(*commands) == [r.Continue()]
            request = stack.policy.streams[0].requests[-1]
            assert request.WhichOneof("event") == kind
            assert dict(request.macros) == macros
        await mta.send(cmd.Quit())
        assert await mta.closed_by_peer()
        await stack.policy.streams[0].finished.wait()
        assert stack.policy.streams[0].ended_by_bridge  # half-closed, not cancelled
        assert stack.policy.streams[0].events()[0] == "start"


async def test_verdicts_and_modifications_arrive_as_libmilter_sends_them() -> None:
    async def decide(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "rcpt_to":
            reply = pb.SmtpReply(code=550, enhanced_code="5.1.1", lines=["no such user", "really"])
            return [
                pb.ProcessResponse(
                    sequence=request.sequence,
                    verdict=pb.Verdict(action=pb.ACTION_REJECT, reply=reply),
                )
            ]
        if request.WhichOneof("event") != "end_of_message":
            return [verdict(request)]
        eom = pb.EndOfMessageResponse(
            modifications=[
                M(add_header=pb.AddHeader(name="X-Policy", value=b"seen")),
                M(change_header=pb.ChangeHeader(name="Subject", index=1, value=b"[x] hi")),
                M(add_recipient=pb.AddRecipient(address="<copy@x>", esmtp_args=["NOTIFY=NEVER"])),
                M(replace_body=pb.ReplaceBody(body=b"z" * 70000)),
                M(quarantine=pb.Quarantine(reason="check")),
            ],
            verdict=pb.Verdict(action=pb.ACTION_ACCEPT),
        )
        return [
            pb.ProcessResponse(sequence=request.sequence, progress=pb.Progress()),
            pb.ProcessResponse(sequence=request.sequence, end_of_message=eom),
        ]

    async with running(h.decide_everything()) as stack:
        stack.policy.decide = decide
        mta = await stack.negotiated()
        for commands in (h.connect(), h.helo(), h.mail()):
            await mta.command(*commands)
        assert await mta.command(*h.rcpt()) == [
            r.ReplyCode(b"550-5.1.1 no such user\r\n550 5.1.1 really")
        ]
        follow: list[list[cmd.MtaCommand]] = [
            h.rcpt(b"<ok@x>"),
            h.content()[:2],
            [cmd.EndOfHeaders()],
        ]
        for commands in follow:
            await mta.command(*commands)
        assert await mta.command(*h.eom()) == [
            r.Progress(),
            r.AddHeader(b"X-Policy", b"seen"),
            r.ChangeHeader(1, b"Subject", b"[x] hi"),
            r.AddRecipientWithArgs(b"<copy@x>", b"NOTIFY=NEVER"),
            r.ReplaceBody(b"z" * 65535),
            r.ReplaceBody(b"z" * 4465),
            r.Quarantine(b"check"),
            r.Accept(),
        ]


async def test_skipped_events_are_never_sent_upstream() -> None:
    async with running(h.eom_only()) as stack:
        mta = await stack.negotiated()
        # NR_* negotiated: nothing comes back for these, and nothing goes to the policy.
        await mta.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt())
        await mta.send(cmd.Header(b"Subject", b"hi"), cmd.Body(b"body\r\n"))
        # Barrier: the next reply answers the next command (end of message).
        assert await mta.command(*h.eom()) == [r.Continue()]
        (stream,) = stack.policy.streams
        assert stream.events() == ["start", "end_of_message"]
        eom = stream.requests[-1].end_of_message
        assert eom.envelope.mail_from.address == "<sender@example.test>"
        assert eom.body == b"body\r\n"


async def test_several_messages_and_quit_new_connection() -> None:
    async with running(h.capabilities(connect=h.DECIDE, end_of_message=h.DECIDE)) as stack:
        mta = await stack.negotiated()
        assert await mta.command(*h.connect()) == [r.Continue()]
        for _ in range(3):
            # NOMAIL, NORCPT, NOHDRS...: the MTA sends only end of message.
            assert await mta.command(*h.eom()) == [r.Continue()]
            await mta.send(cmd.Abort(), cmd.Abort())
        await mta.send(cmd.QuitNewConnection())
        assert await mta.command(*h.connect()) == [r.Continue()]
        assert len(stack.policy.streams) == 2
        assert stack.policy.streams[0].events() == ["start", "connect", *["end_of_message"] * 3]
        await stack.policy.streams[0].finished.wait()
        assert stack.policy.streams[0].ended_by_bridge


async def test_progress_while_the_policy_works_on_end_of_message() -> None:
    release = asyncio.Event()

    async def slow(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        await release.wait()
        return [verdict(request, pb.ACTION_ACCEPT)]

    async with running(h.eom_only(), progress_interval=0.05) as stack:
        stack.policy.decide = slow
        mta = await stack.negotiated()
        await mta.send(*h.connect(), *h.mail(), *h.rcpt(), *h.eom())
        # Two keep-alives from the bridge itself, then the policy is let go.
        for _ in range(2):
            data = await mta.reader.readexactly(5)
            assert data == b"\0\0\0\1p"
        release.set()
        replies = await mta.reply()
        assert replies[-1] == r.Accept()
        assert all(x == r.Progress() for x in replies[:-1])


VERDICTS = [
    (pb.Verdict(action=pb.ACTION_CONTINUE), [r.Continue()]),
    (pb.Verdict(action=pb.ACTION_ACCEPT), [r.Accept()]),
    (pb.Verdict(action=pb.ACTION_REJECT), [r.Reject()]),
    (pb.Verdict(action=pb.ACTION_TEMPFAIL), [r.TempFail()]),
    (pb.Verdict(action=pb.ACTION_DISCARD), [r.Discard()]),
    (
        pb.Verdict(
            action=pb.ACTION_TEMPFAIL,
            reply=pb.SmtpReply(code=451, enhanced_code="4.7.1", lines=["later"]),
        ),
        [r.ReplyCode(b"451 4.7.1 later")],
    ),
]
MODIFICATIONS = [
    (M(add_header=pb.AddHeader(name="X", value=b"1")), r.AddHeader(b"X", b"1")),
    (
        M(insert_header=pb.InsertHeader(index=1, name="X", value=b"1")),
        r.InsertHeader(1, b"X", b"1"),
    ),
    (
        M(change_header=pb.ChangeHeader(name="X", index=2, value=b"v")),
        r.ChangeHeader(2, b"X", b"v"),
    ),
    (M(delete_header=pb.DeleteHeader(name="X", index=1)), r.ChangeHeader(1, b"X", b"")),
    (M(add_recipient=pb.AddRecipient(address="<a@x>")), r.AddRecipient(b"<a@x>")),
    (
        M(add_recipient=pb.AddRecipient(address="<a@x>", esmtp_args=["NOTIFY=NEVER"])),
        r.AddRecipientWithArgs(b"<a@x>", b"NOTIFY=NEVER"),
    ),
    (M(delete_recipient=pb.DeleteRecipient(address="<a@x>")), r.DeleteRecipient(b"<a@x>")),
    (M(change_sender=pb.ChangeSender(address="<s@x>")), r.ChangeSender(b"<s@x>", None)),
    (
        M(change_sender=pb.ChangeSender(address="<s@x>", esmtp_args=["RET=HDRS"])),
        r.ChangeSender(b"<s@x>", b"RET=HDRS"),
    ),
    (M(replace_body=pb.ReplaceBody(body=b"new\r\n")), r.ReplaceBody(b"new\r\n")),
    (M(quarantine=pb.Quarantine(reason="why")), r.Quarantine(b"why")),
]


@pytest.mark.parametrize(("final", "packets"), VERDICTS)
async def test_every_end_of_message_verdict_with_every_modification(
    final: pb.Verdict, packets: list[r.MilterReply]
) -> None:
    async def decide(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        eom = pb.EndOfMessageResponse(modifications=[m for m, _ in MODIFICATIONS], verdict=final)
        return [pb.ProcessResponse(sequence=request.sequence, end_of_message=eom)]

    async with running(h.eom_only()) as stack:
        stack.policy.decide = decide
        mta = await stack.negotiated()
        await mta.send(*h.connect(), *h.mail(), *h.rcpt())
        assert await mta.command(*h.eom()) == [p for _, p in MODIFICATIONS] + packets
