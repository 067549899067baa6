"""After the policy fails, the session sends nothing more of that message, whatever the
read split; every stream it opens begins with `start`."""

from __future__ import annotations

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import encode_all
from milter_bridge.protocol import replies as r
from milter_bridge.session import FailureAction, SendToPolicy
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h
from tests.session.harness import DECIDE, OBSERVE, Mta


def streams_begin_with_start(mta: Mta) -> bool:
    """Every request with sequence 1 is a `start`, and every `start` has sequence 1."""
    return all((q.sequence == 1) == q.HasField("start") for q in mta.to_policy)


def feed_split(
    mta: Mta,
    commands: list[cmd.MtaCommand],
    split: str,
    action: FailureAction = FailureAction.TEMPFAIL,
) -> list[r.MilterReply]:
    """Feed as one read, one read per packet, or one read per byte; answers a failed pending
    event with the failure action as the connection does."""
    data = encode_all(commands)
    if split == "one-read":
        reads = [data]
    elif split == "per-packet":
        reads = [encode_all([c]) for c in commands]
    else:
        reads = [data[i : i + 1] for i in range(len(data))]
    replies: list[r.MilterReply] = []
    for chunk in reads:
        replies += mta._collect(mta.session.feed(chunk))
        while mta.session.pending is not None:
            assert mta.session.policy_failure is not None  # nothing was asked of the policy
            replies += mta._collect(mta.session.fail(action))
    return replies


SPLITS = ["one-read", "per-packet", "per-byte"]
REST_OF_MESSAGE = [*h.rcpt(b"<second@x>"), *h.content(), *h.eom()]


@pytest.mark.parametrize("split", SPLITS)
def test_after_a_failure_at_rcpt_nothing_more_of_the_message_is_sent(split: str) -> None:
    mta = Mta(h.decide_everything())
    mta.send(*h.connect())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.mail())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.rcpt())
    assert mta.fail(FailureAction.TEMPFAIL) == [r.TempFail()]
    sent = len(mta.to_policy)
    # Failure action continue for the later stages, so that the MTA goes on.
    replies = feed_split(mta, REST_OF_MESSAGE, split, FailureAction.CONTINUE)
    # Each later command that awaits an answer gets the failure action at once.
    assert replies == [r.Continue()] * 7  # rcpt, data, 2 headers, eoh, body, eom
    assert len(mta.to_policy) == sent
    # The next message tries the policy again, on a new stream that begins with start.
    mta.send(*h.mail())
    assert mta.events()[sent:] == ["start", "mail_from"]
    assert streams_begin_with_start(mta)


@pytest.mark.parametrize("split", SPLITS)
def test_failure_action_continue_at_data_sends_nothing_more_either(split: str) -> None:
    # DATA decided; the rest only observed, so the MTA sends it without waiting.
    caps = h.capabilities(
        OBSERVE, mail_from=DECIDE, data=DECIDE, end_of_message=DECIDE, actions=h.ALL_ACTIONS
    )
    mta = Mta(caps)
    mta.send(*h.connect(), *h.mail())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.rcpt(), *h.content()[:2])  # DATA
    assert mta.fail(FailureAction.CONTINUE) == [r.Continue()]
    sent = len(mta.to_policy)
    replies = feed_split(mta, [*h.content()[2:], *h.eom(), cmd.Abort()], split)
    assert replies == [r.TempFail()]  # only end of message awaited an answer
    assert len(mta.to_policy) == sent  # no header, body, eom or abort reached a stream
    mta.send(*h.mail())
    assert mta.events()[sent:] == ["start", "mail_from"]
    assert streams_begin_with_start(mta)


def test_a_stream_that_fails_while_outputs_are_carried_out_loses_the_rest() -> None:
    # An observe-only policy: two messages' events come out of one read. The
    # stream fails while the connection hands them over: none of the rest may
    # go out, and the second message (the one in progress) sees no more.
    caps = h.capabilities(OBSERVE, end_of_message=OBSERVE, abort=OBSERVE)
    mta = Mta(caps)
    outputs = mta.session.feed(
        encode_all([*h.connect(), *h.message(), cmd.Abort(), *h.mail(), *h.rcpt()])
    )
    requests = [o for o in outputs if isinstance(o, SendToPolicy)]
    stream = requests[0].stream
    assert {o.stream for o in requests} == {stream}
    mta.session.policy_failed(stream, "the policy took no request for 8s", "timeout")
    assert mta.session.failed_stream == stream  # the connection leaves these out
    # The rest of the second message is not sent; its end (observed) is answered
    # by the bridge as always.
    assert feed_split(mta, [*h.content(), *h.eom()], "one-read") == [r.Continue()]
    assert mta.to_policy == []
    mta.send(cmd.Abort(), *h.mail())
    assert mta.events() == ["start", "mail_from"]
    assert mta.to_policy[0].start.session_id != ""
    assert streams_begin_with_start(mta)


def test_an_earlier_stream_failing_leaves_the_current_one_alone() -> None:
    # QUIT_NC in the same read: the first stream fails while the outputs are
    # carried out, after the session already opened the next one.
    caps = h.capabilities(OBSERVE, end_of_message=DECIDE)
    mta = Mta(caps)
    outputs = mta.session.feed(encode_all([*h.connect(), cmd.QuitNewConnection(), *h.connect()]))
    first, *_, second = [o for o in outputs if isinstance(o, SendToPolicy)]
    assert first.stream != second.stream
    mta.session.policy_failed(first.stream, "stream failed", "stream_error")
    assert mta.session.policy_failure is None
    assert mta.session.stream == second.stream
    mta.send(*h.message())
    assert mta.session.pending is not None
    assert mta.last().HasField("end_of_message")


def test_the_first_reason_of_a_message_is_kept() -> None:
    mta = Mta(h.decide_everything())
    mta.send(*h.connect())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.mail())
    mta.session.policy_failed(mta.session.stream, "first", "timeout")
    mta.session.policy_failed(0, "second", "invalid_reply")
    assert mta.session.policy_failure == ("first", "timeout")
