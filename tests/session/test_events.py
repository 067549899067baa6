"""Every event at every stage reaches the policy with its macros; skipped and observed events
cost the MTA no round trip."""

from __future__ import annotations

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h
from tests.session.harness import DECIDE, OBSERVE, Mta


def test_every_event_with_its_macros_and_sequence() -> None:
    mta = Mta(h.decide_everything())
    for commands, kind, macros in h.every_event():
        assert mta.send(*commands) == []  # the MTA waits for the policy
        request = mta.last()
        assert request.WhichOneof("event") == kind
        assert dict(request.macros) == macros
        assert request.reply_expected
        assert request.sequence == len(mta.to_policy)  # `start` is sequence 1
        assert mta.verdict(pb.ACTION_CONTINUE) == [r.Continue()]
    start = mta.to_policy[0]
    assert start.sequence == 1
    assert start.WhichOneof("event") == "start"
    assert start.start.fingerprint == "fp-1"
    assert start.start.session_id == "conn.1"
    assert start.start.negotiated.protocol_version == 6
    assert start.start.capabilities == h.decide_everything()


def test_event_contents() -> None:
    mta = Mta(h.decide_everything())
    mta.send(cmd.Connect(b"[2001:db8::1]", b"6", 2525, b"IPv6:2001:db8::1"))
    assert mta.last().connect == pb.Connect(
        hostname="[2001:db8::1]", family=pb.ADDRESS_FAMILY_INET6, address="2001:db8::1", port=2525
    )
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Mail(b"<a@example.test>", (b"SIZE=10", b"BODY=8BITMIME")))
    assert mta.last().mail_from == pb.MailFrom(
        address="<a@example.test>", esmtp_args=["SIZE=10", "BODY=8BITMIME"]
    )
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Rcpt(b"<b@example.test>"))
    assert mta.last().rcpt_to == pb.RcptTo(address="<b@example.test>")
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Header(b"X-Bin", b"\xff\xfe raw"))
    assert mta.last().header == pb.Header(name="X-Bin", value=b"\xff\xfe raw")


def test_unix_and_unknown_families() -> None:
    mta = Mta(h.decide_everything())
    mta.send(cmd.Connect(b"localhost", b"L", 0, b"/run/smtp.sock"))
    assert mta.last().connect.family == pb.ADDRESS_FAMILY_UNIX
    assert mta.last().connect.address == "/run/smtp.sock"
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.QuitNewConnection(), cmd.Connect(b"localhost", b"U"))
    assert mta.last().connect == pb.Connect(hostname="localhost", family=pb.ADDRESS_FAMILY_UNKNOWN)


def test_invalid_utf8_is_replaced_and_kept_raw() -> None:
    mta = Mta(h.decide_everything())
    mta.send(cmd.Connect(b"h\xffst", b"4", 1, b"127.0.0.1"))
    assert mta.last().connect.hostname == "h\ufffdst"
    assert mta.last().connect.hostname_raw == b"h\xffst"
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Helo(b"ok"))
    assert mta.last().helo == pb.Helo(name="ok")  # no raw twin for valid UTF-8
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(cmd.Unknown(b"\xc3("))
    assert mta.last().unknown.command_raw == b"\xc3("


def test_observed_events_get_no_packet_where_nr_was_negotiated() -> None:
    mta = Mta(h.capabilities(OBSERVE, end_of_message=DECIDE))
    # Each command is fed alone: a command with NR_* negotiated yields no write at all.
    for command in [*h.connect(), *h.helo(), *h.mail(), *h.rcpt(), *h.content()]:
        assert mta.writes(command) == [], command
    assert mta.events() == [
        "start", "connect", "helo", "mail_from", "rcpt_to", "data", "header", "header",
        "end_of_headers", "body_chunk",
    ]  # fmt: skip
    assert not any(req.reply_expected for req in mta.to_policy)
    # Barrier: the next command that needs an answer gets exactly its own.
    assert mta.send(*h.eom()) == []
    assert mta.last().reply_expected
    assert mta.verdict(pb.ACTION_ACCEPT) == [r.Accept()]


def test_skipped_events_never_reach_the_policy() -> None:
    mta = Mta(h.capabilities(rcpt_to=DECIDE))
    # NO* flags were negotiated, but an MTA that sends the events anyway gets a
    # local continue, and the policy sees nothing of them.
    assert mta.send(*h.connect()) == [r.Continue()]
    assert mta.send(*h.helo()) == [r.Continue()]
    assert mta.send(*h.mail()) == [r.Continue()]
    assert mta.to_policy == []
    assert mta.send(*h.rcpt()) == []
    assert mta.events() == ["start", "rcpt_to"]


def test_v2_mta_gets_local_answers_for_observed_events() -> None:
    offer = cmd.OptionNegotiation(2, ActionFlag(0x1FF), ProtocolFlag(0x7F))
    mta = Mta(h.capabilities(OBSERVE, end_of_message=DECIDE), offer)
    assert mta.send(*h.connect()) == [r.Continue()]  # no NR in version 2: libmilter fakes it
    assert mta.last().WhichOneof("event") == "connect"
    assert not mta.last().reply_expected


def test_header_batch_comes_with_end_of_headers() -> None:
    caps = h.capabilities(header=DECIDE, header_delivery=pb.HEADER_DELIVERY_BATCH)
    mta = Mta(caps)
    headers = [cmd.Header(b"A", b"1"), cmd.Header(b"B", b"2")]
    for header in headers:
        assert mta.send(header) == []  # NR_HDR: collected, MTA not waiting
    assert mta.to_policy == []
    assert mta.send(cmd.EndOfHeaders()) == []
    assert mta.last().end_of_headers.headers == [
        pb.Header(name="A", value=b"1"),
        pb.Header(name="B", value=b"2"),
    ]
    assert mta.last().reply_expected


def test_end_of_message_only_is_one_round_trip_with_everything() -> None:
    mta = Mta(h.eom_only())
    writes = []
    # What an MTA sends after this negotiation: no DATA and no EOH (NODATA, NOEOH).
    sent = [c for c in h.content(b"a\r\n" * 5) if not isinstance(c, cmd.Data | cmd.EndOfHeaders)]
    for command in [*h.connect(), *h.helo(), *h.mail(), *h.rcpt(), *sent]:
        writes += mta.writes(command)
    assert writes == []  # the MTA never waited
    assert mta.to_policy == []  # and nothing went to the policy yet
    mta.send(*h.eom())
    assert mta.events() == ["start", "end_of_message"]
    eom = mta.last().end_of_message
    assert eom.envelope.connect.hostname == "client.example.test"
    assert eom.envelope.helo.name == "client.example.test"
    assert eom.envelope.mail_from.address == "<sender@example.test>"
    assert [rc.address for rc in eom.envelope.recipients] == ["<rcpt@example.test>"]
    assert dict(eom.envelope.macros["connect"].values)["daemon_name"] == "smtpd"
    assert dict(eom.envelope.macros["rcpt_to"].values)["i"] == "QID1"
    assert [hd.name for hd in eom.headers] == ["From", "Subject"]
    assert eom.body == b"a\r\n" * 5
    assert (eom.body_size, eom.body_truncated) == (15, False)
    assert dict(mta.last().macros) == {"i": "QID1"}


def test_buffered_body_is_cut_at_the_limit() -> None:
    caps = h.eom_only()
    caps.body_limit = 10
    mta = Mta(caps)
    mta.send(*h.connect(), *h.mail(), *h.rcpt(), cmd.Body(b"x" * 8), cmd.Body(b"y" * 8), *h.eom())
    eom = mta.last().end_of_message
    assert eom.body == b"x" * 8 + b"yy"
    assert (eom.body_size, eom.body_truncated) == (16, True)


def test_rejected_recipients_are_marked() -> None:
    mta = Mta(h.capabilities(rcpt_to=OBSERVE, rejected_recipients=True))
    mta.send(cmd.DefineMacro(b"R", ((b"{rcpt_mailer}", b"error"),)), cmd.Rcpt(b"<no@x>"))
    assert mta.last().rcpt_to.rejected
    mta.send(cmd.DefineMacro(b"R", ((b"{rcpt_mailer}", b"smtp"),)), cmd.Rcpt(b"<yes@x>"))
    assert not mta.last().rcpt_to.rejected


def test_recipients_the_policy_refused_leave_the_envelope() -> None:
    caps = h.eom_only()
    caps.events.rcpt_to = DECIDE
    mta = Mta(caps)
    mta.send(*h.connect(), *h.mail(), *h.rcpt(b"<bad@x>"))
    assert mta.verdict(pb.ACTION_REJECT) == [r.Reject()]
    mta.send(*h.rcpt(b"<later@x>"))
    assert mta.verdict(pb.ACTION_TEMPFAIL) == [r.TempFail()]
    mta.send(*h.rcpt(b"<good@x>"))
    mta.verdict(pb.ACTION_CONTINUE)
    mta.send(*h.eom())
    assert [x.address for x in mta.last().end_of_message.envelope.recipients] == ["<good@x>"]
