"""What the runtime needs from the session: the unknown-capabilities plan, buffer caps, queue id."""

from __future__ import annotations

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ProtocolFlag
from milter_bridge.session import FailureAction, Plan, Session
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h
from tests.session.harness import Mta


def test_unknown_capabilities_negotiate_only_connect() -> None:
    mta = Mta(h.eom_only())
    mta.session = Session(Plan.unavailable())
    (reply,) = mta.send(h.OFFER_V6)
    assert isinstance(reply, r.OptionNegotiationReply)
    assert reply.actions == 0
    # Every NO* flag but NOCONNECT: the connect-stage failure action decides.
    assert reply.protocol == 0x37F & ~ProtocolFlag.SMFIP_NOCONNECT
    assert mta.send(*h.connect()) == []
    assert mta.session.pending is not None
    assert not mta.session.plan.available
    assert mta.fail(FailureAction.TEMPFAIL) == [r.TempFail()]


def test_collected_headers_are_cut_at_the_limit() -> None:
    mta = Mta(h.eom_only())
    mta.session = Session(Plan.from_capabilities(h.eom_only()), max_header_buffer=100)
    mta.send(h.OFFER_V6, *h.connect(), *h.mail(), *h.rcpt())
    for n in range(10):
        mta.send(cmd.Header(b"X-N", str(n).encode() * 20))  # 23 bytes each
    mta.send(*h.eom())
    eom = mta.last().end_of_message
    assert len(eom.headers) == 4
    assert eom.headers_truncated


def test_collected_headers_are_cut_at_the_count_limit() -> None:
    mta = Mta(h.eom_only())
    mta.session = Session(Plan.from_capabilities(h.eom_only()), max_headers=3)
    mta.send(h.OFFER_V6, *h.connect(), *h.mail(), *h.rcpt())
    for n in range(10):
        mta.send(cmd.Header(b"X-N", str(n).encode()))
    mta.send(*h.eom())
    eom = mta.last().end_of_message
    assert [x.value for x in eom.headers] == [b"0", b"1", b"2"]  # the first ones, in order
    assert eom.headers_truncated
    # The next message starts with none collected.
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.mail(), *h.rcpt(), cmd.Header(b"X-N", b"new"), *h.eom())
    eom = mta.last().end_of_message
    assert ([x.value for x in eom.headers], eom.headers_truncated) == ([b"new"], False)


def test_buffered_body_is_capped_by_the_bridge_too() -> None:
    caps = h.eom_only()
    caps.body_limit = 1000
    mta = Mta(caps)
    mta.session = Session(Plan.from_capabilities(caps), max_body_buffer=10)
    mta.send(h.OFFER_V6, *h.connect(), *h.mail(), *h.rcpt(), cmd.Body(b"x" * 50), *h.eom())
    eom = mta.last().end_of_message
    assert (len(eom.body), eom.body_size, eom.body_truncated) == (10, 50, True)


def test_queue_id_for_log_lines() -> None:
    mta = Mta(h.eom_only())
    mta.send(*h.connect(), *h.mail())
    assert mta.session.queue_id is None  # Postfix: known from the first accepted recipient
    mta.send(*h.rcpt())
    assert mta.session.queue_id == "QID1"


def held_recipients(
    session: Session, count: int, *, reject: frozenset[int] = frozenset()
) -> pb.Envelope:
    """``count`` recipients (the policy decides at RCPT, refusing ``reject``), then the envelope."""
    mta = Mta(session.plan.capabilities)
    mta.session = session
    mta.send(h.OFFER_V6, *h.connect(), *h.mail())
    for n in range(count):
        mta.send(cmd.Rcpt(f"<r{n}@example.test>".encode() + b"x" * 10))
        if session.pending is not None:
            mta.verdict(pb.ACTION_REJECT if n in reject else pb.ACTION_CONTINUE)
    mta.send(*h.eom())
    return mta.last().end_of_message.envelope


def test_recipients_held_for_the_envelope_are_cut_at_the_count_limit() -> None:
    envelope = held_recipients(Session(Plan.from_capabilities(h.eom_only()), max_recipients=3), 10)
    assert [x.address for x in envelope.recipients] == [
        "<r0@example.test>xxxxxxxxxx",
        "<r1@example.test>xxxxxxxxxx",
        "<r2@example.test>xxxxxxxxxx",
    ]
    assert envelope.recipients_truncated


def test_recipients_held_for_the_envelope_are_cut_at_the_byte_limit() -> None:
    # Each RCPT payload: 27 bytes of address and its NUL; three fit in 100 bytes.
    session = Session(Plan.from_capabilities(h.eom_only()), max_recipient_buffer=100)
    envelope = held_recipients(session, 10)
    assert len(envelope.recipients) == 3
    assert envelope.recipients_truncated
    # Under the limits: all of them, not truncated.
    envelope = held_recipients(Session(Plan.from_capabilities(h.eom_only())), 10)
    assert (len(envelope.recipients), envelope.recipients_truncated) == (10, False)


def test_a_refused_recipient_beyond_the_limit_leaves_the_held_ones_alone() -> None:
    caps = h.eom_only()
    caps.events.rcpt_to = h.DECIDE
    session = Session(Plan.from_capabilities(caps), max_recipients=2)
    envelope = held_recipients(session, 5, reject=frozenset({1, 3, 4}))
    # r1 was refused (not a recipient); r3 and r4 were never held: r0 and r2 stay.
    assert [x.address[:4] for x in envelope.recipients] == ["<r0@", "<r2@"]
    assert envelope.recipients_truncated


def test_recipients_are_not_held_for_a_policy_without_the_envelope() -> None:
    caps = h.capabilities(rcpt_to=h.OBSERVE, end_of_message=h.DECIDE)
    session = Session(Plan.from_capabilities(caps), max_recipients=1)
    mta = Mta(caps)
    mta.session = session
    mta.send(h.OFFER_V6, *h.connect(), *h.mail())
    for n in range(5):
        mta.send(cmd.Rcpt(f"<r{n}@example.test>".encode()))
    # Every recipient still reached the policy as an event; none was kept.
    assert [e for e in mta.events() if e == "rcpt_to"] == ["rcpt_to"] * 5
    assert session.message.recipients == []
    mta.send(*h.eom())
    assert not mta.last().end_of_message.HasField("envelope")
