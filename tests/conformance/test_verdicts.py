"""Verdicts through real MTAs: what a real SMTP client sees, and what is delivered."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from milter_bridge.v1 import policy_pb2 as pb
from tests.conformance.conftest import World, started_world
from tests.conformance.smtp import Message, send
from tests.runtime.policy import verdict

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(
    loop_scope="session", scope="session", params=[1, 2], ids=["1", "2 workers"]
)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """Every verdict through the bridge in one process and through two workers."""
    async with started_world(workers=request.param) as started:
        yield started


def at(stage: str, answer: pb.Verdict, *, rcpt: str | None = None) -> object:
    """A policy that gives ``answer`` at one stage (for one recipient) and continues elsewhere."""

    async def decide(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        event = request.WhichOneof("event")
        if event == stage and (rcpt is None or rcpt in request.rcpt_to.address):
            return [pb.ProcessResponse(sequence=request.sequence, verdict=answer)]
        return [verdict(request)]

    return decide


def custom(action: int, code: int, xcode: str, *lines: str) -> pb.Verdict:
    reply = pb.SmtpReply(code=code, enhanced_code=xcode, lines=list(lines))
    return pb.Verdict(action=action, reply=reply)  # type: ignore[arg-type]


async def test_plain_accept_leaves_the_message_unchanged(fresh: World, mta_name: str) -> None:
    mta = fresh.mtas[mta_name]
    message = Message(headers=[("X-Original", b"kept")], body=b"line one\r\nline two\r\n")
    transcript = await send(mta.port, message)
    assert transcript.accepted
    delivered = await fresh.sink.next()
    assert delivered.header("X-Original") == ["kept"]
    assert delivered.header("Subject") == ["test"]
    assert delivered.body == b"line one\r\nline two\r\n"
    assert delivered.recipients == ["<rcpt@example.test>"]


# Where a custom reply at each stage is seen by the client.
STAGES = ["mail_from", "rcpt_to", "end_of_message"]


def reply_seen(stage: str, transcript: object) -> tuple[int, bytes] | None:
    from tests.conformance.smtp import Transcript  # noqa: PLC0415

    assert isinstance(transcript, Transcript)
    if stage == "mail_from":
        return transcript.mail
    if stage == "rcpt_to":
        return transcript.rcpt[0] if transcript.rcpt else None
    return transcript.data


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (pb.Verdict(action=pb.ACTION_REJECT), 5),
        (pb.Verdict(action=pb.ACTION_TEMPFAIL), 4),
        (
            custom(pb.ACTION_REJECT, 550, "5.7.1", "policy says no"),
            (550, b"5.7.1 {addr}policy says no"),
        ),
        (custom(pb.ACTION_TEMPFAIL, 451, "4.7.1", "try later"), (451, b"4.7.1 try later")),
        (
            custom(pb.ACTION_REJECT, 554, "5.7.0", "first line", "second line"),
            (554, b"5.7.0 first line\n5.7.0 second line"),
        ),
    ],
    ids=["reject", "tempfail", "custom-5xx", "custom-4xx", "multi-line"],
)
async def test_refusals_reach_the_client(
    fresh: World, mta_name: str, stage: str, answer: pb.Verdict, expected: object
) -> None:
    fresh.policy.decide = at(stage, answer)  # type: ignore[assignment]
    transcript = await send(fresh.mtas[mta_name].port, Message(subject=f"refused at {stage}"))
    seen = reply_seen(stage, transcript)
    assert seen is not None, transcript
    if isinstance(expected, int):
        assert seen[0] // 100 == expected, seen
    else:
        assert isinstance(expected, tuple)
        assert seen == (
            expected[0],
            expected[1].replace(b"{addr}", address_prefix(mta_name, stage)),
        )
    assert not transcript.accepted
    # Barrier: a later marker arrives, and nothing before it.
    fresh.policy.decide = at("never", pb.Verdict())  # type: ignore[assignment]
    assert (await send(fresh.mtas[mta_name].port, Message(subject="marker"))).accepted
    assert (await fresh.sink.next()).header("Subject") == ["marker"]


def address_prefix(mta: str, stage: str) -> bytes:
    """Sendmail puts the address before a custom single-line 5xx text at MAIL and RCPT."""
    if mta != "sendmail" or stage not in ("mail_from", "rcpt_to"):
        return b""
    return b"<sender@example.test>... " if stage == "mail_from" else b"<rcpt@example.test>... "


async def test_one_of_two_recipients_refused(fresh: World, mta_name: str) -> None:
    answer = custom(pb.ACTION_REJECT, 550, "5.1.1", "no such user here")
    fresh.policy.decide = at("rcpt_to", answer, rcpt="bad@")  # type: ignore[assignment]
    message = Message(rcpts=["bad@example.test", "good@example.test"])
    transcript = await send(fresh.mtas[mta_name].port, message)
    prefix = b"<bad@example.test>... " if mta_name == "sendmail" else b""
    assert transcript.rcpt == [
        (550, b"5.1.1 " + prefix + b"no such user here"),
        (250, transcript.rcpt[1][1]),
    ]
    assert transcript.accepted
    delivered = await fresh.sink.next()
    assert delivered.recipients == ["<good@example.test>"]


async def test_discard_delivers_nowhere(fresh: World, mta_name: str) -> None:
    fresh.policy.decide = at("end_of_message", pb.Verdict(action=pb.ACTION_DISCARD))  # type: ignore[assignment]
    transcript = await send(fresh.mtas[mta_name].port, Message(subject="discard me"))
    assert transcript.accepted  # the client is told it was accepted
    fresh.policy.decide = at("never", pb.Verdict())  # type: ignore[assignment]
    assert (await send(fresh.mtas[mta_name].port, Message(subject="marker"))).accepted
    assert (await fresh.sink.next()).header("Subject") == ["marker"]  # nothing came before it


# What a client sees for a refusal at CONNECT or HELO differs per MTA:
# (mta, stage, answer) -> (greeting, helo, mail) as the client saw them.
SESSION_REFUSALS: dict[tuple[str, str, str], tuple[object, object, object]] = {
    # Postfix answers the connection with its own text; the policy's is not shown.
    ("postfix", "connect", "reject"): (
        (554, b"mta.example.test ESMTP not accepting connections"),
        None,
        None,
    ),
    ("postfix", "connect", "custom-421"): (
        (421, b"mta.example.test Service unavailable - try again later"),
        None,
        None,
    ),
    # Postfix reports a HELO refusal at MAIL FROM, with the policy's text; a 421 at once.
    ("postfix", "helo", "reject"): (220, 250, (550, b"5.7.1 go away")),
    ("postfix", "helo", "custom-421"): (220, (421, b"4.7.0 later"), None),
    # Debian's Sendmail is built without _FFR_MILTER_CONNECT_REPLYCODE: its own text at connect.
    ("sendmail", "connect", "reject"): (
        (554, b"sm.example.test ESMTP not accepting messages"),
        None,
        None,
    ),
    ("sendmail", "connect", "custom-421"): (
        (421, b"4.7.0 sm.example.test closing connection"),
        None,
        None,
    ),
    ("sendmail", "helo", "reject"): (220, 250, (550, b"5.7.1 go away")),
    ("sendmail", "helo", "custom-421"): (220, (421, b"4.7.0 later"), None),
    # A refusal that is not a 421 waits for MAIL FROM on both (4xx), or ends the session at
    # CONNECT (5xx); Sendmail shows its own text for what came at CONNECT.
    ("postfix", "connect", "tempfail"): (
        220,
        250,
        (451, b"4.7.1 Service unavailable - try again later"),
    ),
    ("postfix", "helo", "tempfail"): (
        220,
        250,
        (451, b"4.7.1 Service unavailable - try again later"),
    ),
    ("postfix", "connect", "custom-451"): (220, 250, (451, b"4.7.1 later please")),
    ("postfix", "helo", "custom-451"): (220, 250, (451, b"4.7.1 later please")),
    ("postfix", "connect", "multi-line"): (
        (554, b"mta.example.test ESMTP not accepting connections"),
        None,
        None,
    ),
    ("postfix", "helo", "multi-line"): (220, 250, (554, b"5.7.1 first line\n5.7.1 second line")),
    ("sendmail", "connect", "tempfail"): (220, 250, (451, b"4.3.2 Please try again later")),
    ("sendmail", "helo", "tempfail"): (220, 250, (451, b"4.3.2 Please try again later")),
    ("sendmail", "connect", "custom-451"): (220, 250, (451, b"4.3.2 Please try again later")),
    ("sendmail", "helo", "custom-451"): (220, 250, (451, b"4.7.1 later please")),
    ("sendmail", "connect", "multi-line"): (
        (554, b"sm.example.test ESMTP not accepting messages"),
        None,
        None,
    ),
    ("sendmail", "helo", "multi-line"): (220, 250, (554, b"5.7.1 first line\n5.7.1 second line")),
}
SESSION_ANSWERS = {
    "reject": custom(pb.ACTION_REJECT, 550, "5.7.1", "go away"),
    "custom-421": custom(pb.ACTION_TEMPFAIL, 421, "4.7.0", "later"),
    "tempfail": pb.Verdict(action=pb.ACTION_TEMPFAIL),
    "custom-451": custom(pb.ACTION_TEMPFAIL, 451, "4.7.1", "later please"),
    "multi-line": custom(pb.ACTION_REJECT, 554, "5.7.1", "first line", "second line"),
}


def _matches(seen: tuple[int, bytes] | None, expected: object) -> bool:
    if isinstance(expected, int):
        return seen is not None and seen[0] == expected
    return seen == expected


@pytest.mark.parametrize("stage", ["connect", "helo"])
@pytest.mark.parametrize("answer", sorted(SESSION_ANSWERS))
async def test_session_refusals(fresh: World, mta_name: str, stage: str, answer: str) -> None:
    expected = SESSION_REFUSALS.get((mta_name, stage, answer))
    assert expected is not None, f"no expectation recorded for {mta_name} {stage} {answer}"
    fresh.policy.decide = at(stage, SESSION_ANSWERS[answer])  # type: ignore[assignment]
    transcript = await send(fresh.mtas[mta_name].port, Message())
    seen = (transcript.greeting, transcript.helo, transcript.mail)
    assert all(_matches(s, e) for s, e in zip(seen, expected, strict=True)), transcript
    assert not transcript.accepted
