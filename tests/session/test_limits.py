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
