"""A conversation replayed on another shared stream (session/journal.py), bytes in and
requests out: what was answered comes back as observed with the verdict it got, what
awaits an answer is asked again, finished messages are left out, and the bounds hold."""

from __future__ import annotations

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.session import FailureAction
from milter_bridge.session.journal import JOURNAL_LIMIT, MAX_REPLAYS
from milter_bridge.v1 import policy_pb2 as pb
from tests.session.harness import (
    DECIDE,
    OBSERVE,
    Mta,
    capabilities,
    connect,
    content,
    decide_everything,
    eom,
    helo,
    mail,
    rcpt,
)

EOM_CONTINUE = pb.EndOfMessageResponse(verdict=pb.Verdict(action=pb.ACTION_CONTINUE))


def shared(caps: pb.Capabilities) -> Mta:
    return Mta(caps, replays=MAX_REPLAYS)


def through_helo(mta: Mta) -> None:
    mta.send(*connect())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*helo())
    mta.verdict(pb.ACTION_CONTINUE)


def test_answered_events_come_back_decided_and_the_pending_one_is_asked_again() -> None:
    mta = shared(decide_everything())
    through_helo(mta)
    mta.send(*mail())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*rcpt(b"<no@example.test>"))
    mta.verdict(pb.ACTION_REJECT, code=550, lines=["no such user"])
    mta.send(*rcpt(b"<yes@example.test>"))
    sent = mta.to_policy[:]
    replayed = mta.replay()

    assert [q.WhichOneof("event") for q in replayed] == [
        "start", "connect", "helo", "mail_from", "rcpt_to", "rcpt_to"
    ]  # fmt: skip
    assert replayed[0].start.attempt == 1
    assert replayed[0].start.session_id == sent[0].start.session_id
    assert [q.sequence for q in replayed] == [q.sequence for q in sent]
    *answered, pending = replayed[1:]
    assert [q.decided.action for q in answered] == [pb.ACTION_CONTINUE] * 3 + [pb.ACTION_REJECT]
    assert answered[-1].decided.reply.lines == ["no such user"]
    assert not any(q.reply_expected for q in answered)
    assert pending.reply_expected
    assert not pending.HasField("decided")
    assert pending.rcpt_to.address == "<yes@example.test>"
    # The answer on the new stream answers the MTA, as the first one would have.
    assert mta.verdict(pb.ACTION_CONTINUE) == [r.Continue()]


def test_a_finished_message_is_left_out_and_a_new_one_kept() -> None:
    mta = shared(capabilities(OBSERVE, mail_from=DECIDE, end_of_message=DECIDE))
    mta.send(*connect(), *helo(), *mail())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*rcpt(), *content(), *eom())
    mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=EOM_CONTINUE))
    mta.send(*mail(b"<second@example.test>"))
    replayed = mta.replay()
    assert [q.WhichOneof("event") for q in replayed] == ["start", "connect", "helo", "mail_from"]
    assert replayed[-1].mail_from.address == "<second@example.test>"
    assert replayed[-1].reply_expected


def test_an_aborted_message_is_left_out() -> None:
    mta = shared(capabilities(OBSERVE, end_of_message=DECIDE, rcpt_to=DECIDE))
    mta.send(*connect(), *helo(), *mail(), *rcpt())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Abort(), *mail(b"<again@example.test>"), *rcpt())
    replayed = mta.replay()
    assert [q.WhichOneof("event") for q in replayed] == [
        "start", "connect", "helo", "mail_from", "rcpt_to"
    ]  # fmt: skip
    assert replayed[3].mail_from.address == "<again@example.test>"


def test_at_most_max_replays_then_the_failure_action() -> None:
    mta = shared(capabilities(OBSERVE, end_of_message=DECIDE))
    mta.send(*connect(), *helo(), *mail(), *rcpt(), *content(), *eom())
    attempts = [mta.replay()[0].start.attempt for _ in range(MAX_REPLAYS)]
    assert attempts == list(range(1, MAX_REPLAYS + 1))
    assert mta.replay() == []
    mta.session.policy_failed(mta.session.stream, "gone", "unreachable")
    assert mta.fail(FailureAction.TEMPFAIL) == [r.TempFail()]


def test_replays_are_counted_per_conversation() -> None:
    """QUIT_NC begins a new SMTP session: a new conversation, with replays of its own."""
    mta = shared(capabilities(OBSERVE, mail_from=DECIDE))
    mta.send(*connect(), *helo(), *mail())
    for _ in range(MAX_REPLAYS):
        mta.replay()
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.QuitNewConnection(), *connect(), *helo(), *mail())
    assert mta.replay()[0].start.attempt == 1


def test_a_message_past_the_journal_limit_is_not_replayed_until_it_ends() -> None:
    mta = shared(
        capabilities(OBSERVE, end_of_message=DECIDE, body_delivery=pb.BODY_DELIVERY_STREAM)
    )
    mta.send(*connect(), *helo(), *mail(), *rcpt(), *content())
    chunk = b"x" * 60_000
    for _ in range(JOURNAL_LIMIT // len(chunk) + 1):
        mta.send(cmd.Body(chunk))
    mta.send(*eom())
    assert mta.replay() == []
    mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=EOM_CONTINUE))
    mta.send(*mail())
    # Only the session and the new message are needed: within the limit again.
    assert [q.WhichOneof("event") for q in mta.replay()][-1] == "mail_from"


@pytest.mark.parametrize("why", ["process streams", "failed", "stale stream"])
def test_no_replay(why: str) -> None:
    mta = Mta(decide_everything(), replays=0 if why == "process streams" else MAX_REPLAYS)
    mta.send(*connect())
    stream = mta.session.stream
    if why == "failed":
        mta.session.policy_failed(stream, "bad answer", "invalid_reply")
    if why == "stale stream":
        stream -= 1
    assert mta.session.replay(stream) == []


def test_an_unknown_command_inside_an_oversized_message_is_kept_for_later_replays() -> None:
    """The session's own events are kept while they alone fit: an UNKNOWN that arrives
    while a message is past the limit (here by its recipients) still counts, and once that
    message is over the conversation (with the UNKNOWN) can be replayed again."""
    caps = capabilities(OBSERVE, end_of_message=DECIDE, unknown=OBSERVE)
    mta = shared(caps)
    mta.send(*connect(), *helo(), *mail())
    long = b"x" * 6000
    for n in range(JOURNAL_LIMIT // len(long) + 1):
        mta.send(cmd.Rcpt(b"<%d%s@example.test>" % (n, long)))
    mta.send(cmd.Unknown(b"XFOO bar"), *content(), *eom())
    assert mta.replay() == []
    mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=EOM_CONTINUE))
    mta.send(*mail())
    events = [q.WhichOneof("event") for q in mta.replay()]
    assert events == ["start", "connect", "helo", "unknown", "mail_from"]
