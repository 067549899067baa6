"""``milter-bridge load`` against scripted milters: what it sends, and what it calls an error.

Each test runs the load tool (its async API) against a FakeMilter on port 0 and
then waits for the milter's connection handlers to end (the barrier) before
looking at what the milter received.
"""

from __future__ import annotations

import io
from fractions import Fraction

import pytest

from milter_bridge.load import LoadConfig, Report, Shape, run
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.constants import MacroStage, ProtocolFlag
from tests.load.fake_milter import CLOSE, Answer, Close, Conversation, FakeMilter, optneg, serving

P = ProtocolFlag
MESSAGE = ["DM", "M", "DR", "R", "DT", "T", "DL", "L", "DL", "L", "DN", "N", "DB", "B", "DE", "E"]


async def load(milter: FakeMilter, count: int = 1, timeout: float = 10.0, **kw: object) -> Report:
    names = ("headers", "body_size", "recipients", "marker_share")
    shape = Shape(**{k: kw.pop(k) for k in names if k in kw})  # type: ignore[arg-type]
    config = LoadConfig(milter.target, count=count, timeout=timeout, shape=shape, **kw)  # type: ignore[arg-type]
    report = await run(config)
    await milter.all_ended()
    return report


def at(kind: type, *replies: r.MilterReply) -> Answer:
    """Answer commands of one kind with these replies, everything else by default."""

    def answer(command: MtaCommand, _: Conversation) -> list[r.MilterReply] | None:
        return list(replies) if isinstance(command, kind) else None

    return answer


async def test_usual_flow_every_event_awaited_two_messages_on_one_connection() -> None:
    async with serving(optneg()) as milter:
        report = await load(milter, count=2, messages_per_connection=2, headers=2, body_size=70000)
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"eom accept": 2}
    assert report.connections == 1
    assert report.latency.messages == 2
    (conv,) = milter.conversations
    message = [*MESSAGE[:13], "B", "DB", "B", *MESSAGE[14:]]  # 65535 + 4465 bytes of body
    # Postfix: ABORT after every message and once more before QUIT.
    assert conv.codes() == ["O", "DC", "C", "DH", "H", *message, "A", *message, "A", "A", "Q"]
    bodies = [c for c in conv.commands if isinstance(c, cmd.Body)]
    assert [len(b.chunk) for b in bodies[:2]] == [65535, 4465]
    assert b"".join(b.chunk for b in bodies[:2]).endswith(b"\r\n")
    (connect,) = conv.macros(b"C")
    assert [name for name, _ in connect] == [b"j", b"{daemon_name}", b"{daemon_addr}", b"v", b"_"]
    mail = conv.macros(b"M")[0]
    assert dict(mail) == {
        b"{mail_addr}": b"sender@example.test",
        b"{mail_host}": b"example.test",
        b"{mail_mailer}": b"smtp",
    }  # no queue id at MAIL: Postfix has none before the first accepted recipient
    data = conv.macros(b"T")
    assert data[0][0][0] == b"i"
    assert data[0] != data[1]  # a queue id per message
    headers = [c for c in conv.commands if isinstance(c, cmd.Header)]
    assert headers[:2] == [
        cmd.Header(b"Subject", b"load test message"),
        cmd.Header(b"From", b"Load Sender <sender@example.test>"),
    ]


async def test_opted_out_events_are_not_sent_but_postfix_sends_their_macros() -> None:
    no = P.SMFIP_NOCONNECT | P.SMFIP_NOHELO | P.SMFIP_NODATA | P.SMFIP_NOHDRS
    no |= P.SMFIP_NOEOH | P.SMFIP_NOBODY | P.SMFIP_NR_MAIL | P.SMFIP_NR_RCPT
    async with serving(optneg(int(no))) as milter:
        report = await load(milter, count=1)
    assert report.ok, report.protocol_errors
    (conv,) = milter.conversations
    assert conv.codes() == ["O", "DC", "DH", "DM", "M", "DR", "R", "DT", "DE", "E", "A", "A", "Q"]


async def test_macro_lists_of_the_milter_replace_postfix_defaults_per_stage() -> None:
    lists = (
        (MacroStage.SMFIM_CONNECT, b"j {client_addr} client_port"),
        (MacroStage.SMFIM_ENVRCPT, b"{rcpt_addr} i"),
        (MacroStage.SMFIM_EOM, b"i {msg_id}"),
    )
    async with serving(optneg(int(P.SMFIP_NOHDRS), macros=lists)) as milter:
        report = await load(milter, recipients=2)
    assert report.ok, report.protocol_errors
    assert report.negotiated[0].macros == {
        "connect": "j {client_addr} client_port",
        "envrcpt": "{rcpt_addr} i",
        "eom": "i {msg_id}",
    }
    (conv,) = milter.conversations
    ((j, addr, port),) = conv.macros(b"C")
    assert (j, addr, port[0]) == (
        (b"j", b"mta.example.test"),
        (b"{client_addr}", b"192.0.2.1"),
        b"client_port",
    )
    assert port[1].isdigit()
    first, second = conv.macros(b"R")
    assert first == ((b"{rcpt_addr}", b"rcpt1@example.test"),)
    assert second[0] == (b"{rcpt_addr}", b"rcpt2@example.test")
    assert second[1][0] == b"i"  # the queue id exists once a recipient was accepted
    (eom,) = conv.macros(b"E")
    assert eom == (second[1],)  # {msg_id} has no value in Postfix: left out


async def test_macro_lists_without_setsymlist_are_a_protocol_error() -> None:
    lists = ((MacroStage.SMFIM_CONNECT, b"j"),)
    async with serving(optneg(actions=0x1, macros=lists)) as milter:
        report = await load(milter)
    assert report.protocol_errors.by_kind == {"negotiation": 1}
    assert "without SMFIF_SETSYMLIST" in str(report.protocol_errors.first[0]["text"])
    assert report.outcomes == {"eom accept": 1}


async def test_version_2_gets_no_data_and_no_data_macros() -> None:
    async with serving(optneg(version=2)) as milter:
        report = await load(milter, headers=1, body_size=10)
    assert report.ok
    (conv,) = milter.conversations
    assert "T" not in conv.codes()
    assert "DT" not in conv.codes()


@pytest.mark.parametrize("leading_space", [False, True])
async def test_header_values_with_and_without_the_leading_space(*, leading_space: bool) -> None:
    flags = P.SMFIP_HDR_LEADSPC if leading_space else P.NONE
    async with serving(optneg(int(flags))) as milter:
        await load(milter, headers=5)
    headers = [c for c in milter.conversations[0].commands if isinstance(c, cmd.Header)]
    assert len(headers) == 5
    assert all(h.value.startswith(b" ") == leading_space for h in headers)


@pytest.mark.parametrize("negotiated", [True, False])
async def test_skip_ends_the_body(*, negotiated: bool) -> None:
    flags = P.SMFIP_SKIP if negotiated else P.NONE
    async with serving(optneg(int(flags)), at(cmd.Body, r.Skip())) as milter:
        report = await load(milter, body_size=200_000)
    assert report.outcomes == {"eom accept": 1}
    codes = milter.conversations[0].codes()
    assert codes[codes.index("DB") :] == ["DB", "B", "DE", "E", "A", "A", "Q"]
    if negotiated:
        assert report.ok
    else:
        assert report.protocol_errors.by_kind == {"invalid": 1}


async def test_a_reply_to_an_event_without_reply_is_a_protocol_error() -> None:
    answer = at(cmd.Header, r.Continue())  # although NR_HDR was negotiated
    async with serving(optneg(int(P.SMFIP_NR_HDR)), answer) as milter:
        report = await load(milter, headers=3)
    assert not report.ok
    assert report.protocol_errors.by_kind["unexpected"] >= 1
    assert "while the MTA waited for none" in str(report.protocol_errors.first[0]["text"])


async def test_an_undecodable_reply_ends_the_connection() -> None:
    def answer(command: MtaCommand, _: Conversation) -> bytes | None:
        return b"\0\0\0\x01Z" if isinstance(command, cmd.EndOfMessage) else None

    async with serving(optneg(), answer) as milter:
        report = await load(milter, count=2)
    assert report.outcomes == {"eom protocol error": 2}
    assert report.protocol_errors.by_kind == {"malformed": 2}
    assert report.latency.messages == 0
    assert "Q" not in milter.conversations[0].codes()


async def test_a_modification_before_end_of_message_is_fatal_as_in_postfix() -> None:
    answer = at(cmd.Rcpt, r.AddHeader(b"X-Early", b"1"), r.Continue())
    async with serving(optneg(), answer) as milter:
        report = await load(milter)
    assert report.outcomes == {"rcpt protocol error": 1}
    assert report.protocol_errors.first[0]["text"] == "add_header at rcpt"


EVERY_MODIFICATION = (
    r.Progress(),
    r.AddHeader(b"X-A", b"1"),
    r.InsertHeader(0, b"X-I", b"1"),
    r.ChangeHeader(1, b"X-C", b"2"),
    r.ChangeHeader(1, b"X-D", b""),
    r.AddRecipient(b"<new@example.test>"),
    r.AddRecipientWithArgs(b"<new2@example.test>", b"NOTIFY=NEVER"),
    r.DeleteRecipient(b"<rcpt1@example.test>"),
    r.ChangeSender(b"<other@example.test>"),
    r.ReplaceBody(b"x" * 65535),
    r.ReplaceBody(b"y\r\n"),
    r.Quarantine(b"held"),
    r.Progress(),
    r.ReplyCode(b"550 5.7.1 no"),
)


async def test_end_of_message_with_progress_and_every_modification() -> None:
    async with serving(optneg(), at(cmd.EndOfMessage, *EVERY_MODIFICATION)) as milter:
        report = await load(milter, count=3)
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"eom reject 550": 3}
    kinds = ["add_header", "insert_header", "change_header", "delete_header", "add_recipient"]
    kinds += ["add_recipient_with_args", "delete_recipient", "change_sender", "replace_body"]
    assert report.modifications == dict.fromkeys([*kinds, "quarantine"], 3)
    assert report.progress == 6


async def test_modifications_that_were_not_negotiated_are_counted_as_errors() -> None:
    async with serving(optneg(actions=0x1), at(cmd.EndOfMessage, *EVERY_MODIFICATION)) as milter:
        report = await load(milter)
    assert report.protocol_errors.by_kind == {"invalid": 8}
    assert report.outcomes == {"eom reject 550": 1}


async def test_body_replacement_interleaved_with_other_modifications_is_fatal() -> None:
    replies = (r.ReplaceBody(b"a"), r.AddHeader(b"X", b"1"), r.ReplaceBody(b"b"), r.Accept())
    async with serving(optneg(), at(cmd.EndOfMessage, *replies)) as milter:
        report = await load(milter)
    assert report.outcomes == {"eom protocol error": 1}
    assert "interleaved" in str(report.protocol_errors.first[0]["text"])


@pytest.mark.parametrize(
    ("kind", "reply", "outcome"),
    [
        (cmd.Mail, r.Reject(), "mail reject"),
        (cmd.Mail, r.Accept(), "mail accept"),
        (cmd.Rcpt, r.ReplyCode(b"550 5.1.1 no such user"), "rcpt reject 550"),
        (cmd.Rcpt, r.Discard(), "rcpt discard"),
        (cmd.Data, r.TempFail(), "data tempfail"),
        (cmd.Header, r.Accept(), "header accept"),
        (cmd.EndOfHeaders, r.Discard(), "eoh discard"),
        (cmd.Body, r.ReplyCode(b"451-4.7.1 try\r\n451 4.7.1 later"), "body tempfail 451"),
        (cmd.EndOfMessage, r.Continue(), "eom continue"),
    ],
)
async def test_a_verdict_ends_the_message_at_its_stage(
    kind: type, reply: r.MilterReply, outcome: str
) -> None:
    async with serving(optneg(), at(kind, reply)) as milter:
        report = await load(milter, count=2, messages_per_connection=2)
    assert report.ok, report.protocol_errors
    assert report.outcomes == {outcome: 2}
    codes = milter.conversations[0].codes()
    assert codes[-3:] == ["A", "A", "Q"]
    assert codes.count("A") == 3
    if kind is not cmd.EndOfMessage:
        assert "E" not in codes


@pytest.mark.parametrize(
    ("kind", "reply", "outcome"),
    [
        (cmd.Connect, r.Reject(), "connect reject"),
        (cmd.Connect, r.ReplyCode(b"421 4.3.2 busy"), "connect tempfail 421"),
        (cmd.Helo, r.Accept(), "helo accept"),
    ],
)
async def test_a_verdict_at_connect_or_helo_ends_the_session_without_quit(
    kind: type, reply: r.MilterReply, outcome: str
) -> None:
    async with serving(optneg(), at(kind, reply)) as milter:
        report = await load(milter, count=2, messages_per_connection=2)
    assert report.ok
    assert report.outcomes == {outcome: 2}  # one new connection per message
    assert len(milter.conversations) == 2
    for conversation in milter.conversations:
        # No MAIL, no ABORT, no QUIT: the last command is the one that was answered.
        assert conversation.codes()[-1] == ("C" if kind is cmd.Connect else "H")


async def test_discard_at_connect_is_ignored_as_postfix_does_and_counted() -> None:
    async with serving(optneg(), at(cmd.Connect, r.Discard())) as milter:
        report = await load(milter)
    assert report.outcomes == {"eom accept": 1}
    assert report.protocol_errors.by_kind == {"invalid": 1}


async def test_refusing_one_recipient_of_three_refuses_only_that_one() -> None:
    def answer(command: MtaCommand, _: Conversation) -> list[r.MilterReply] | None:
        if isinstance(command, cmd.Rcpt) and command.address.startswith(b"<rcpt2@"):
            return [r.TempFail()]
        return None

    async with serving(optneg(), answer) as milter:
        report = await load(milter, recipients=3)
    assert report.outcomes == {"eom accept": 1}
    assert report.refused_recipients == {"tempfail": 1}


async def test_refusing_every_recipient_ends_the_message() -> None:
    async with serving(optneg(), at(cmd.Rcpt, r.Reject())) as milter:
        report = await load(milter, recipients=2)
    assert report.outcomes == {"rcpt reject": 1}
    assert report.refused_recipients == {"reject": 2}
    (conv,) = milter.conversations
    # Without an accepted recipient Postfix has no queue id.
    assert all(b"i" not in dict(m) for m in conv.macros(b"R"))


async def test_no_answer_within_the_timeout() -> None:
    async with serving(optneg(), at(cmd.EndOfMessage)) as milter:
        report = await load(milter, timeout=0.2)
    assert report.outcomes == {"eom timeout": 1}
    assert report.protocol_errors.by_kind == {"timeout": 1}


async def test_the_milter_closes_the_connection_mid_message() -> None:
    def answer(command: MtaCommand, _: Conversation) -> Close | None:
        return CLOSE if isinstance(command, cmd.EndOfMessage) else None

    async with serving(optneg(), answer) as milter:
        report = await load(milter)
    assert report.outcomes == {"eom closed": 1}
    assert report.protocol_errors.by_kind == {"closed": 1}


async def test_nothing_listens() -> None:
    milter = FakeMilter(optneg())
    await milter.start()
    await milter.stop()  # a port that was just free
    report = await load(milter, count=3)
    assert report.outcomes == {"connection failed": 3}
    assert report.protocol_errors.total == 0
    assert not report.ok
    assert len(report.connection_failures) == 3
    assert (report.latency.worst_answer_ms, report.latency.worst_answer_stage) == (0.0, "")


@pytest.mark.parametrize(
    ("negotiation", "text"),
    [
        (optneg(version=7), "version 7"),
        (optneg(version=1), "version 1"),
        (optneg(actions=0x200), "actions 0x200"),
    ],
)
async def test_an_impossible_negotiation_ends_the_session(
    negotiation: r.OptionNegotiationReply, text: str
) -> None:
    async with serving(negotiation) as milter:
        report = await load(milter)
    assert report.outcomes == {"optneg protocol error": 1}
    assert text in str(report.protocol_errors.first[0]["text"])


async def test_protocol_flags_that_were_not_offered_are_counted() -> None:
    async with serving(optneg(protocol=int(P.SMFIP_MDS_256K))) as milter:
        report = await load(milter)
    assert report.outcomes == {"eom accept": 1}
    assert report.protocol_errors.by_kind == {"negotiation": 1}


@pytest.mark.parametrize(
    "text", [b"550 2.0.0 no", b"250 ok", b"550", b"550 5.7.1 a\r\n451 4.7.1 b", b"55x 5.7.1"]
)
async def test_malformed_custom_replies(text: bytes) -> None:
    async with serving(optneg(), at(cmd.EndOfMessage, r.ReplyCode(text))) as milter:
        report = await load(milter)
    assert report.outcomes == {"eom protocol error": 1}
    assert "malformed custom reply" in str(report.protocol_errors.first[0]["text"])


async def test_the_marker_goes_to_every_kth_message() -> None:
    async with serving(optneg()) as milter:
        report = await load(milter, count=10, marker_share=Fraction(3, 10), concurrency=3)
    assert report.messages == 10
    subjects = [
        c.value
        for conv in milter.conversations
        for c in conv.commands
        if isinstance(c, cmd.Header) and c.name == b"Subject"
    ]
    assert len(subjects) == 10
    assert subjects.count(b"load test message REJECT") == 3


async def test_a_duration_instead_of_a_count() -> None:
    progress = io.StringIO()
    async with serving(optneg()) as milter:
        config = LoadConfig(milter.target, duration=0.5, concurrency=2, messages_per_connection=3)
        report = await run(config, progress=progress)
        await milter.all_ended()
    assert report.ok
    assert report.messages > 0
    assert report.elapsed_s >= 0.5
    assert report.outcomes == {"eom accept": report.messages}
    ends = sum(conv.codes().count("E") for conv in milter.conversations)
    assert ends == report.messages
    assert all(conv.codes()[-2:] == ["A", "Q"] for conv in milter.conversations)
    assert progress.getvalue().endswith("\r")  # the live line is wiped at the end


@pytest.mark.parametrize(
    ("kind", "stage"),
    [
        (cmd.OptionNegotiation, "optneg"),
        (cmd.Helo, "helo"),
        (cmd.Data, "data"),
        (cmd.EndOfMessage, "eom"),
    ],
)
async def test_the_worst_single_answer_and_its_stage(kind: type, stage: str) -> None:
    async with serving(optneg(), delays={kind: 0.2}) as milter:
        report = await load(milter, count=2)
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"eom accept": 2}
    assert report.latency.worst_answer_stage == stage
    assert report.latency.worst_answer_ms >= 200


async def test_the_answers_of_failed_and_abandoned_messages_count_too() -> None:
    def answer(command: MtaCommand, _: Conversation) -> Close | None:
        return CLOSE if isinstance(command, cmd.EndOfMessage) else None

    async with serving(optneg(), answer, delays={cmd.Mail: 0.2}) as milter:
        report = await load(milter)
    assert report.outcomes == {"eom closed": 1}
    assert report.latency.messages == 0
    assert report.latency.worst_answer_stage == "mail"
    assert report.latency.worst_answer_ms >= 200
    async with serving(optneg(), delays={cmd.Rcpt: 0.2}) as milter:
        report = await load(milter, count=3, abandon_share=Fraction(1))
    # The RCPT of the second message goes unanswered; the third's is answered, then DATA is left.
    assert report.outcomes == {
        "abandoned mail fin": 1,
        "abandoned rcpt fin": 1,
        "abandoned data fin": 1,
    }
    assert report.latency.messages == 0
    assert report.latency.worst_answer_stage == "rcpt"
    assert report.latency.worst_answer_ms >= 200


OPENING = ["O", "DC", "C", "DH", "H"]
_HEADERS = ["DL", "L"] * 4
# What the milter got of a message abandoned at each point, in the order the points are
# taken: 2 recipients, 4 headers, 70,000 bytes of body (2 chunks). No ABORT, no QUIT.
ABANDONED_AT = {
    "mail": ["DM", "M"],
    "rcpt": ["DM", "M", "DR", "R"],  # after the first recipient
    "data": ["DM", "M", "DR", "R", "DR", "R", "DT", "T"],
    "header": ["DM", "M", "DR", "R", "DR", "R", "DT", "T", *_HEADERS[:4]],  # half of them
    "eoh": ["DM", "M", "DR", "R", "DR", "R", "DT", "T", *_HEADERS, "DN", "N"],
    # The second chunk's packet is cut in half: the milter never gets a whole one.
    "body": ["DM", "M", "DR", "R", "DR", "R", "DT", "T", *_HEADERS, "DN", "N", "DB", "B", "DB"],
    "eom": [
        *("DM", "M", "DR", "R", "DR", "R", "DT", "T", *_HEADERS, "DN", "N"),
        *("DB", "B", "DB", "B", "DE", "E"),
    ],
}


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_every_abandon_point_in_turn(how: str) -> None:
    async with serving(optneg()) as milter:
        report = await load(
            milter,
            count=7,
            abandon_share=Fraction(1),
            abandon=how,
            recipients=2,
            headers=4,
            body_size=70000,
        )
    assert report.ok, report.protocol_errors
    assert report.outcomes == {f"abandoned {point} {how}": 1 for point in ABANDONED_AT}
    assert report.latency.messages == 0
    assert report.connections == 7
    for conversation, codes in zip(milter.conversations, ABANDONED_AT.values(), strict=True):
        assert conversation.codes() == [*OPENING, *codes]
        # Over TCP the milter reads what was sent, then a reset (rst) or the end of the stream.
        reset = isinstance(conversation.error, ConnectionResetError)
        assert reset == (how == "rst"), conversation.error


async def test_an_abandoned_connection_is_not_reused() -> None:
    async with serving(optneg()) as milter:
        report = await load(
            milter, count=6, messages_per_connection=3, abandon_share=Fraction(1, 2)
        )
    assert report.ok, report.protocol_errors
    # Messages 0, 2 and 4 are abandoned, at the first three points.
    assert report.outcomes == {
        "eom accept": 3,
        "abandoned mail fin": 1,
        "abandoned rcpt fin": 1,
        "abandoned data fin": 1,
    }
    assert report.latency.messages == 3
    assert report.connections == 4
    codes = [conversation.codes() for conversation in milter.conversations]
    assert [c[-2:] for c in codes] == [["DM", "M"], ["DR", "R"], ["DT", "T"], ["A", "Q"]]
    assert [c.count("E") for c in codes] == [0, 1, 1, 1]


async def test_a_verdict_before_the_point_ends_the_message_as_usual() -> None:
    async with serving(optneg(), at(cmd.Rcpt, r.Reject())) as milter:
        report = await load(milter, count=7, abandon_share=Fraction(1), abandon="rst")
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"abandoned mail rst": 1, "abandoned rcpt rst": 1, "rcpt reject": 5}
    assert report.latency.messages == 5


async def test_points_the_negotiation_leaves_out_are_not_taken() -> None:
    no = P.SMFIP_NOMAIL | P.SMFIP_NORCPT | P.SMFIP_NODATA | P.SMFIP_NOEOH | P.SMFIP_NOBODY
    async with serving(optneg(int(no | P.SMFIP_NR_HDR))) as milter:
        report = await load(milter, count=4, abandon_share=Fraction(1))
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"abandoned header fin": 2, "abandoned eom fin": 2}
    header, eom, _, _ = (conversation.codes() for conversation in milter.conversations)
    assert (header.count("L"), header[-1]) == (5, "L")  # 5 of 10 headers, without reply
    assert eom[-2:] == ["DE", "E"]
    assert eom.count("L") == 10


async def test_no_half_chunk_after_skip() -> None:
    async with serving(optneg(int(P.SMFIP_SKIP)), at(cmd.Body, r.Skip())) as milter:
        report = await load(milter, count=6, abandon_share=Fraction(1), body_size=200_000)
    assert report.ok, report.protocol_errors
    assert report.outcomes["abandoned body fin"] == 1
    # 4 chunks: abandoned in the third, but SKIP came at the first: no more body after it.
    assert milter.conversations[5].codes()[-3:] == ["N", "DB", "B"]
