"""A connection's life: several messages, ABORT anywhere and twice, QUIT, QUIT_NC, out-of-order
commands handled as libmilter handles them, macro invalidation."""

from __future__ import annotations

import pytest

from milter_bridge.protocol import MalformedPacket, ProtocolError, UnknownCommand
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h
from tests.session.harness import DECIDE, OBSERVE, Mta


def eom_policy_with_abort() -> pb.Capabilities:
    caps = h.eom_only()
    caps.events.abort = OBSERVE
    return caps


def accept_message(mta: Mta, *extra: cmd.MtaCommand) -> None:
    mta.send(*h.message(), *extra)
    assert mta.last().WhichOneof("event") == "end_of_message"
    assert mta.verdict(pb.ACTION_ACCEPT) == [r.Accept()]


@pytest.mark.parametrize("messages", [2, 3])
def test_several_messages_with_postfix_aborts(messages: int) -> None:
    mta = Mta(eom_policy_with_abort())
    mta.send(*h.connect(), *h.helo())
    for n in range(messages):
        # Postfix sends ABORT after every message, sometimes twice; the message is
        # over already, so libmilter (and the bridge) ignore them without a reply.
        before = len(mta.to_policy)
        accept_message(mta)
        assert mta.send(cmd.Abort(), cmd.Abort()) == []
        assert len(mta.to_policy) == before + (2 if n == 0 else 1)  # `start` once
        eom = mta.last().end_of_message
        assert len(eom.envelope.recipients) == 1  # nothing left over from the last message
        assert [hd.name for hd in eom.headers] == ["From", "Subject"]
    assert "abort" not in mta.events()
    mta.send(cmd.Quit())
    assert mta.stream_ends == 1
    assert mta.session.finished


def test_abort_inside_a_message_reaches_the_policy_once_and_resets_it() -> None:
    mta = Mta(h.capabilities(mail_from=OBSERVE, rcpt_to=DECIDE, abort=OBSERVE))
    mta.send(*h.connect(), *h.mail(), *h.rcpt())
    mta.verdict(pb.ACTION_CONTINUE)
    assert mta.send(cmd.Abort()) == []  # never answered
    assert mta.send(cmd.Abort()) == []  # doubled: ignored
    assert mta.events() == ["start", "mail_from", "rcpt_to", "abort"]
    assert not mta.last().reply_expected
    # The next message starts clean.
    mta.send(*h.mail(b"<other@example.test>"), *h.rcpt())
    assert mta.events()[-2:] == ["mail_from", "rcpt_to"]
    assert mta.to_policy[-2].mail_from.address == "<other@example.test>"


def test_abort_before_the_policy_saw_the_message_is_not_sent() -> None:
    mta = Mta(eom_policy_with_abort())
    mta.send(*h.connect(), *h.mail(), *h.rcpt(), cmd.Abort())
    assert mta.to_policy == []
    mta.send(*h.mail(), *h.rcpt(b"<second@example.test>"), *h.eom())
    eom = mta.last().end_of_message
    assert [rc.address for rc in eom.envelope.recipients] == ["<second@example.test>"]


def test_abort_while_an_answer_is_pending_waits_its_turn() -> None:
    mta = Mta(eom_policy_with_abort())
    mta.send(*h.connect(), *h.mail(), *h.rcpt())
    assert mta.send(*h.eom(), cmd.Abort(), cmd.Quit()) == []
    assert mta.events()[-1] == "end_of_message"
    assert mta.stream_ends == 0
    # The queued ABORT (after a finished message: ignored) and QUIT follow the answer.
    assert mta.verdict(pb.ACTION_CONTINUE) == [r.Continue()]
    assert mta.stream_ends == 1
    assert "abort" not in mta.events()


def test_quit_new_connection_starts_a_new_stream() -> None:
    mta = Mta(h.capabilities(connect=DECIDE, end_of_message=DECIDE))
    mta.send(*h.connect())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.message())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.QuitNewConnection())
    assert mta.stream_ends == 1
    assert not mta.session.finished
    mta.send(cmd.Connect(b"second.example.test", b"4", 1, b"127.0.0.2"))
    assert mta.events()[-2:] == ["start", "connect"]
    assert mta.to_policy[-2].start.session_id == "conn.2"
    assert mta.last().sequence == 2  # numbering starts again with the new stream
    assert dict(mta.last().macros) == {}  # QUIT_NC cleared the old connection's macros


def test_quit_ends_everything() -> None:
    mta = Mta(h.capabilities(connect=DECIDE))
    mta.send(*h.connect())
    mta.verdict(pb.ACTION_CONTINUE)
    assert mta.send(cmd.Quit(), *h.connect()) == []  # nothing is read after QUIT
    assert mta.stream_ends == 1
    assert mta.events() == ["start", "connect"]


def test_quit_inside_a_message_aborts_it_first() -> None:
    mta = Mta(h.capabilities(rcpt_to=DECIDE, abort=OBSERVE))
    mta.send(*h.connect(), *h.mail(), *h.rcpt())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Quit())
    assert mta.events()[-1] == "abort"
    assert mta.stream_ends == 1


def test_connection_lost_ends_the_stream() -> None:
    mta = Mta(h.capabilities(connect=DECIDE))
    mta.send(*h.connect())
    assert mta._collect(mta.session.connection_lost()) == []
    assert mta.stream_ends == 1
    assert mta.session.pending is None


def test_accept_at_connect_stops_events_for_the_session() -> None:
    mta = Mta(h.decide_everything())
    mta.send(*h.connect())
    assert mta.verdict(pb.ACTION_ACCEPT) == [r.Accept()]
    # An MTA that keeps sending anyway gets libmilter's treatment, but the policy sees nothing.
    mta.send(*h.helo())
    assert mta.events() == ["start", "connect"]


def test_accept_at_mail_stops_events_for_that_message_only() -> None:
    mta = Mta(h.decide_everything())
    mta.send(*h.connect())
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.mail())
    mta.verdict(pb.ACTION_ACCEPT)
    mta.send(*h.mail(b"<next@example.test>"))
    assert mta.last().mail_from.address == "<next@example.test>"


def test_rejected_recipient_keeps_the_message_going() -> None:
    mta = Mta(h.decide_everything())
    mta.send(*h.connect())
    for commands in (h.mail(), h.rcpt(b"<bad@x>")):
        mta.verdict(pb.ACTION_CONTINUE)
        mta.send(*commands)
    assert mta.verdict(pb.ACTION_REJECT) == [r.Reject()]
    mta.send(*h.rcpt(b"<good@x>"))
    assert mta.last().rcpt_to.address == "<good@x>"


def test_out_of_order_command_is_ignored_without_reply() -> None:
    # libmilter: HEADER cannot follow HELO, nor HELO's successors: dropped, no reply.
    mta = Mta(h.decide_everything())
    mta.send(*h.connect())
    mta.verdict(pb.ACTION_CONTINUE)
    assert mta.send(cmd.Header(b"Subject", b"early")) == []
    assert mta.session.pending is None
    assert mta.events() == ["start", "connect"]
    # Barrier: the next valid command is answered normally.
    mta.send(*h.helo())
    assert mta.last().WhichOneof("event") == "helo"


def test_mail_in_the_middle_of_a_message_aborts_it() -> None:
    mta = Mta(h.capabilities(DECIDE, abort=OBSERVE))
    mta.send(*h.connect())
    for commands in (h.mail(), h.rcpt(), [cmd.Data()]):
        mta.verdict(pb.ACTION_CONTINUE)
        mta.send(*commands)
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.mail(b"<restart@x>"))
    assert mta.events()[-2:] == ["abort", "mail_from"]


def test_skipped_stages_may_be_passed_over() -> None:
    # With NOMAIL negotiated, RCPT may follow HELO directly (libmilter's skip bits).
    mta = Mta(h.capabilities(rcpt_to=DECIDE))
    mta.send(*h.connect(), *h.helo())
    mta.send(*h.rcpt())
    assert mta.last().WhichOneof("event") == "rcpt_to"


def test_body_skip_without_smfip_skip_stops_forwarding() -> None:
    offer = cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF & ~0x400))
    mta = Mta(h.decide_everything(), offer)
    mta.send(*h.connect())
    for commands in (h.mail(), h.rcpt(), [cmd.Data()], [cmd.EndOfHeaders()], [cmd.Body(b"1")]):
        mta.verdict(pb.ACTION_CONTINUE)
        mta.send(*commands)
    assert mta.verdict(pb.ACTION_SKIP) == [r.Continue()]  # the MTA does not know 's'
    assert mta.send(cmd.Body(b"2")) == [r.Continue()]  # answered locally
    assert mta.events().count("body_chunk") == 1


def test_macros_of_later_stages_are_invalidated() -> None:
    caps = h.eom_only()
    mta = Mta(caps)
    mta.send(*h.connect(), *h.mail(), *h.rcpt(), *h.eom())
    assert dict(mta.last().end_of_message.envelope.macros["rcpt_to"].values)["i"] == "QID1"
    mta.verdict(pb.ACTION_CONTINUE)
    # A new MAIL clears the RCPT, DATA, EOH and EOM macros; CONNECT's stay.
    mta.send(cmd.Mail(b"<x@y>"), cmd.Rcpt(b"<z@y>"), cmd.EndOfMessage())
    envelope = mta.last().end_of_message.envelope
    assert dict(envelope.macros["rcpt_to"].values) == {}
    assert dict(envelope.macros["connect"].values)["j"] == "mx.example.test"
    assert dict(mta.last().macros) == {}


def test_braced_and_bare_macro_names_are_the_same_macro() -> None:
    mta = Mta(h.capabilities(helo=DECIDE))
    mta.send(cmd.DefineMacro(b"H", ((b"{j}", b"braced"), (b"{tls_version}", b"TLSv1.3"))))
    mta.send(cmd.Helo(b"x"))
    assert dict(mta.last().macros) == {"j": "braced", "tls_version": "TLSv1.3"}


def test_macros_for_header_and_body_belong_to_no_stage() -> None:
    mta = Mta(h.decide_everything())
    mta.send(cmd.DefineMacro(b"L", ((b"x", b"1"),)), cmd.DefineMacro(b"B", ()), *h.connect())
    assert dict(mta.last().macros) == {"j": "mx.example.test", "daemon_name": "smtpd"}


def test_commands_before_option_negotiation_are_ignored() -> None:
    mta = Mta(h.decide_everything(), offer=None)
    assert mta.send(*h.connect()) == []
    assert mta.to_policy == []


def test_bad_mta_input_raises_protocol_errors() -> None:
    mta = Mta(h.decide_everything())
    with pytest.raises(UnknownCommand):
        mta.session.feed(b"\0\0\0\1Z")
    with pytest.raises(MalformedPacket):
        Mta(h.decide_everything()).session.feed(b"\0\0\0\2H!")


def test_an_mta_that_does_not_wait_is_cut_off() -> None:
    mta = Mta(h.capabilities(connect=DECIDE))
    mta.send(*h.connect())
    with pytest.raises(ProtocolError, match="without waiting"):
        mta.send(*[cmd.Helo(b"x")] * 17)
    assert mta.session.finished  # nothing more is read from this connection


def test_unknown_command_inside_a_message_keeps_it_going() -> None:
    # Postfix sends UNKNOWN inside a transaction too; libmilter's UNKN state cannot
    # reach HDRS/EOHS/ENDM and would leave end of message unanswered.
    caps = h.eom_only()
    caps.events.unknown = OBSERVE
    mta = Mta(caps)
    mta.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt(), cmd.Unknown(b"XFOO"))
    mta.send(cmd.Header(b"Subject", b"hi"), cmd.Body(b"b\r\n"))
    assert mta.send(*h.eom()) == []
    assert mta.events() == ["start", "unknown", "end_of_message"]
    eom = mta.last().end_of_message
    assert [hd.name for hd in eom.headers] == ["Subject"]
    assert eom.body == b"b\r\n"
    assert mta.verdict(pb.ACTION_ACCEPT) == [r.Accept()]


def test_unknown_inside_a_message_then_mail_aborts_it() -> None:
    mta = Mta(h.capabilities(DECIDE, abort=OBSERVE))
    mta.send(*h.connect())
    for commands in (h.mail(), h.rcpt(), [cmd.Unknown(b"XFOO")]):
        mta.verdict(pb.ACTION_CONTINUE)
        mta.send(*commands)
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.mail(b"<again@x>"))
    assert mta.events()[-2:] == ["abort", "mail_from"]


def test_message_without_headers_still_gets_its_end_of_message() -> None:
    # Found by the model MTA: wants headers (for end of message) but not EOH.
    caps = h.eom_only()
    caps.body_delivery = pb.BODY_DELIVERY_NONE
    caps.events.data = OBSERVE
    mta = Mta(caps)
    mta.send(*h.connect(), *h.mail(), *h.rcpt(), cmd.Data())
    assert mta.send(*h.eom()) == []
    assert mta.last().WhichOneof("event") == "end_of_message"
    assert mta.verdict(pb.ACTION_CONTINUE) == [r.Continue()]
