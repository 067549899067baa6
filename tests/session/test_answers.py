"""The valid-answer table, cell by cell, and the exact packets of each valid answer."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from milter_bridge.protocol import InvalidAnswer
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.session import FailureAction, Stage
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h
from tests.session.harness import Mta

# The commands after connect that bring a decide-everything session to each stage.
_PATH: list[tuple[Stage, list[MtaCommand]]] = [
    (Stage.CONNECT, h.connect()),
    (Stage.HELO, h.helo()),
    (Stage.MAIL, h.mail()),
    (Stage.RCPT, h.rcpt()),
    (Stage.DATA, [cmd.Data()]),
    (Stage.HEADER, [cmd.Header(b"Subject", b"hi")]),
    (Stage.EOH, [cmd.EndOfHeaders()]),
    (Stage.BODY, [cmd.Body(b"x\r\n")]),
    (Stage.EOM, h.eom()),
]
STAGES = [*(s for s, _ in _PATH), Stage.UNKNOWN]


def at(stage: Stage, caps: pb.Capabilities | None = None) -> Mta:
    """A session waiting for the policy's answer to ``stage``."""
    mta = Mta(caps or h.decide_everything())
    if stage is Stage.UNKNOWN:
        mta.send(*h.connect())
        mta.verdict(pb.ACTION_CONTINUE)
        mta.send(cmd.Unknown(b"XFOO"))
    else:
        for step, commands in _PATH:
            mta.send(*commands)
            if step is stage:
                break
            mta.verdict(pb.ACTION_CONTINUE)
    assert mta.session.pending is not None
    assert mta.session.pending.stage is stage
    return mta


def respond(**answer: object) -> Callable[[Mta], list[r.MilterReply]]:
    def send(mta: Mta) -> list[r.MilterReply]:
        return mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), **answer))  # type: ignore[arg-type]

    return send


def verdict(action: int, **reply: object) -> Callable[[Mta], list[r.MilterReply]]:
    def send(mta: Mta) -> list[r.MilterReply]:
        return mta.verdict(action, **reply)

    return send


EVERYWHERE = set(STAGES)
MAIL_ON = EVERYWHERE - {Stage.CONNECT, Stage.HELO, Stage.UNKNOWN}
ADD_X = pb.Modification(add_header=pb.AddHeader(name="X-A", value=b"1"))
EOM_CONTINUE = pb.EndOfMessageResponse(
    modifications=[ADD_X], verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
)

# answer name -> (how to send it, stages where it is valid, the packets it yields)
TABLE: dict[str, tuple[Callable[[Mta], list[r.MilterReply]], set[Stage], list[r.MilterReply]]] = {
    "continue": (verdict(pb.ACTION_CONTINUE), EVERYWHERE, [r.Continue()]),
    "accept": (verdict(pb.ACTION_ACCEPT), EVERYWHERE - {Stage.UNKNOWN}, [r.Accept()]),
    "reject": (verdict(pb.ACTION_REJECT), EVERYWHERE, [r.Reject()]),
    "tempfail": (verdict(pb.ACTION_TEMPFAIL), EVERYWHERE, [r.TempFail()]),
    "reject with reply": (
        verdict(pb.ACTION_REJECT, code=550, enhanced_code="5.7.1", lines=["no"]),
        EVERYWHERE,
        [r.ReplyCode(b"550 5.7.1 no")],
    ),
    "tempfail with reply": (
        verdict(pb.ACTION_TEMPFAIL, code=451, enhanced_code="4.7.1", lines=["later"]),
        EVERYWHERE,
        [r.ReplyCode(b"451 4.7.1 later")],
    ),
    "discard": (verdict(pb.ACTION_DISCARD), MAIL_ON, [r.Discard()]),
    "skip": (verdict(pb.ACTION_SKIP), {Stage.BODY}, [r.Skip()]),
    "progress": (respond(progress=pb.Progress()), {Stage.EOM}, [r.Progress()]),
    "modifications": (
        respond(end_of_message=EOM_CONTINUE),
        {Stage.EOM},
        [r.AddHeader(b"X-A", b"1"), r.Continue()],
    ),
}


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
@pytest.mark.parametrize("answer", TABLE, ids=str)
def test_valid_answer_table(answer: str, stage: Stage) -> None:
    send, valid_at, packets = TABLE[answer]
    mta = at(stage)
    if stage in valid_at:
        assert send(mta) == packets
        return
    with pytest.raises(InvalidAnswer, match=f"^answer to {stage.value}"):
        send(mta)
    # Refused answers change nothing: the MTA still gets the right answer afterwards.
    assert mta.session.pending is not None
    assert mta.verdict(pb.ACTION_TEMPFAIL) == [r.TempFail()]


def test_progress_any_number_of_times_before_the_final_answer() -> None:
    mta = at(Stage.EOM)
    progress = respond(progress=pb.Progress())
    assert progress(mta) + progress(mta) == [r.Progress(), r.Progress()]
    assert mta.session.progress() != []  # the bridge's own keep-alive too
    assert mta.verdict(pb.ACTION_ACCEPT) == [r.Accept()]
    assert mta.session.progress() == []  # nothing waits any more


def test_all_replies_to_one_command_are_one_write() -> None:
    mta = at(Stage.EOM)
    answer = pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=EOM_CONTINUE)
    writes = [o for o in mta.session.answer(answer) if hasattr(o, "data")]
    assert len(writes) == 1


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (pb.SmtpReply(code=550, lines=["plain"]), b"550 plain"),
        (
            pb.SmtpReply(code=554, enhanced_code="5.7.0", lines=["100% spam"]),
            b"554 5.7.0 100%% spam",
        ),
        (
            pb.SmtpReply(code=550, enhanced_code="5.7.1", lines=["first", "second", "last"]),
            b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 last",
        ),
        (pb.SmtpReply(code=550, lines=["a", "b"]), b"550-a\r\n550 b"),
        (pb.SmtpReply(code=550, enhanced_code="5.7.1", lines=["5 tries"]), b"550 5.7.1 5 tries"),
    ],
)
def test_custom_reply_formatting(reply: pb.SmtpReply, text: bytes) -> None:
    mta = at(Stage.RCPT)
    response = pb.ProcessResponse(
        sequence=mta.pending_sequence(), verdict=pb.Verdict(action=pb.ACTION_REJECT, reply=reply)
    )
    assert mta.answer(response) == [r.ReplyCode(text)]


@pytest.mark.parametrize(
    ("action", "reply", "problem"),
    [
        (pb.ACTION_REJECT, pb.SmtpReply(code=451, lines=["x"]), "not a 5xx code"),
        (pb.ACTION_TEMPFAIL, pb.SmtpReply(code=550, lines=["x"]), "not a 4xx code"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=5500, lines=["x"]), "not a 5xx code"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, enhanced_code="4.7.1", lines=["x"]), "5.x.y"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, enhanced_code="5.7", lines=["x"]), "5.x.y"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, lines=[]), "1 to 32 lines"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, lines=["x"] * 33), "1 to 32 lines"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, lines=["a\r\n550 b"]), "CR, LF or NUL"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, lines=["x" * 981]), "longer than 980"),
        (pb.ACTION_TEMPFAIL, pb.SmtpReply(code=451, lines=["5 minutes"]), "starts with a digit"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, lines=["caf\u00e9"]), "printable US-ASCII"),
        (pb.ACTION_REJECT, pb.SmtpReply(code=550, lines=["\x1b[31mred"]), "printable US-ASCII"),
        (
            pb.ACTION_REJECT,
            pb.SmtpReply(code=550, enhanced_code="5.\u0667.1", lines=["x"]),
            "5.x.y",
        ),
        (pb.ACTION_CONTINUE, pb.SmtpReply(code=550, lines=["x"]), "REJECT or TEMPFAIL"),
        (pb.ACTION_UNSPECIFIED, None, "not a valid Action"),
    ],
)
def test_invalid_verdicts(action: int, reply: pb.SmtpReply | None, problem: str) -> None:
    mta = at(Stage.MAIL)
    verdict_ = pb.Verdict(action=action)  # type: ignore[arg-type]
    if reply is not None:
        verdict_.reply.CopyFrom(reply)
    with pytest.raises(InvalidAnswer, match=problem):
        mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), verdict=verdict_))


def test_wrong_sequence_and_nothing_pending() -> None:
    mta = at(Stage.HELO)
    seq = mta.pending_sequence()
    go_on = pb.Verdict(action=pb.ACTION_CONTINUE)
    with pytest.raises(InvalidAnswer, match=f"but {seq} \\(helo\\) awaits"):
        mta.answer(
            pb.ProcessResponse(sequence=seq + 1, verdict=pb.Verdict(action=pb.ACTION_CONTINUE))
        )
    with pytest.raises(InvalidAnswer, match="holds no verdict"):
        mta.answer(pb.ProcessResponse(sequence=seq))
    assert mta.verdict(pb.ACTION_CONTINUE) == [r.Continue()]
    with pytest.raises(InvalidAnswer, match="no event awaits"):
        mta.answer(pb.ProcessResponse(sequence=seq, verdict=go_on))


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
@pytest.mark.parametrize("action", list(FailureAction), ids=lambda a: a.name)
def test_failure_action_at_every_stage(stage: Stage, action: FailureAction) -> None:
    mta = at(stage)
    expected = {
        FailureAction.TEMPFAIL: r.TempFail(),
        FailureAction.REJECT: r.Reject(),
        FailureAction.ACCEPT: r.Accept() if stage is not Stage.UNKNOWN else r.Continue(),
        FailureAction.CONTINUE: r.Continue(),
    }[action]
    assert mta.fail(action) == [expected]
    assert mta.session.pending is None
    assert mta.fail(action) == []  # nothing left to fail


def test_what_an_invalid_answer_quotes_is_bounded() -> None:
    # Failure lines quote the answer; an answer may be megabytes (a policy's bug).
    mta = at(Stage.EOM)
    huge = pb.AddHeader(name="X-Big", value=b"\x01" * (1 << 20))
    eom = pb.EndOfMessageResponse(verdict=pb.Verdict(action=pb.ACTION_CONTINUE))
    eom.modifications.add(add_header=huge)
    with pytest.raises(InvalidAnswer) as caught:
        mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=eom))
    assert "(1048576 in all)" in str(caught.value)
    assert len(str(caught.value)) < 600
    bad = pb.SmtpReply(code=550, lines=["x\n" * 100_000])
    mta = at(Stage.MAIL)
    with pytest.raises(InvalidAnswer) as caught:
        mta.verdict(pb.ACTION_REJECT, code=bad.code, lines=list(bad.lines))
    assert len(str(caught.value)) < 600


def test_an_action_the_enum_does_not_name_is_refused_with_a_reply_too() -> None:
    # Found by fuzzing (fuzz/regressions/session_answer/unnamed-action-with-reply).
    mta = at(Stage.MAIL)
    with pytest.raises(InvalidAnswer, match="not 10"):
        mta.verdict(10, code=550, lines=["no"])
