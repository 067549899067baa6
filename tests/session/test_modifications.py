"""End-of-message modifications: exact packets in order, then the verdict; invalid ones refused."""

from __future__ import annotations

import pytest

from milter_bridge.protocol import InvalidAnswer
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.session import Stage
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h
from tests.session.test_answers import at

M = pb.Modification


def finish(mods: list[pb.Modification], caps: pb.Capabilities | None = None) -> list[r.MilterReply]:
    mta = at(Stage.EOM, caps)
    answer = pb.EndOfMessageResponse(
        modifications=mods, verdict=pb.Verdict(action=pb.ACTION_ACCEPT)
    )
    return mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=answer))


def test_every_modification_in_order_then_the_verdict() -> None:
    mods = [
        M(add_header=pb.AddHeader(name="X-Spam", value=b"yes")),
        M(insert_header=pb.InsertHeader(index=0, name="X-First", value=b"1")),
        M(change_header=pb.ChangeHeader(name="Subject", index=1, value=b"[SPAM] hi")),
        M(delete_header=pb.DeleteHeader(name="Received", index=2)),
        M(add_recipient=pb.AddRecipient(address="<a@x>")),
        M(
            add_recipient=pb.AddRecipient(
                address="<b@x>", esmtp_args=["NOTIFY=NEVER", "ORCPT=rfc822;b@x"]
            )
        ),
        M(delete_recipient=pb.DeleteRecipient(address="<c@x>")),
        M(change_sender=pb.ChangeSender(address="<s@x>")),
        M(change_sender=pb.ChangeSender(address="<t@x>", esmtp_args=["RET=HDRS"])),
        M(replace_body=pb.ReplaceBody(body=b"new\r\n")),
        M(quarantine=pb.Quarantine(reason="looks odd")),
    ]
    assert finish(mods) == [
        r.AddHeader(b"X-Spam", b"yes"),
        r.InsertHeader(0, b"X-First", b"1"),
        r.ChangeHeader(1, b"Subject", b"[SPAM] hi"),
        r.ChangeHeader(2, b"Received", b""),
        r.AddRecipient(b"<a@x>"),
        r.AddRecipientWithArgs(b"<b@x>", b"NOTIFY=NEVER ORCPT=rfc822;b@x"),
        r.DeleteRecipient(b"<c@x>"),
        r.ChangeSender(b"<s@x>", None),
        r.ChangeSender(b"<t@x>", b"RET=HDRS"),
        r.ReplaceBody(b"new\r\n"),
        r.Quarantine(b"looks odd"),
        r.Accept(),
    ]


def test_large_body_goes_in_contiguous_65535_byte_pieces() -> None:
    body = bytes(range(256)) * 600  # 153600 bytes
    mods = [
        M(replace_body=pb.ReplaceBody(body=body)),
        M(add_header=pb.AddHeader(name="X", value=b"y")),
    ]
    replies = finish(mods)
    chunks = [x for x in replies if isinstance(x, r.ReplaceBody)]
    assert [len(x.chunk) for x in chunks] == [65535, 65535, 22530]
    assert b"".join(x.chunk for x in chunks) == body
    assert replies[3:] == [r.AddHeader(b"X", b"y"), r.Accept()]


def test_empty_replacement_body_is_one_empty_packet() -> None:
    assert finish([M(replace_body=pb.ReplaceBody(body=b""))]) == [r.ReplaceBody(b""), r.Accept()]


def test_header_folding_is_normalised_to_lf() -> None:
    value = b"first\r\n\tsecond\n third"
    assert finish([M(add_header=pb.AddHeader(name="X-Long", value=value))])[0] == r.AddHeader(
        b"X-Long", b"first\n\tsecond\n third"
    )


def test_delete_recipient_by_raw_bytes() -> None:
    mod = M(delete_recipient=pb.DeleteRecipient(address="ignored", address_raw=b"<\xff@x>"))
    assert finish([mod])[0] == r.DeleteRecipient(b"<\xff@x>")


@pytest.mark.parametrize(
    ("mod", "problem"),
    [
        (M(add_header=pb.AddHeader(name="X-Evil", value=b"a\r\nBcc: victim@x")), "does not fold"),
        (M(add_header=pb.AddHeader(name="X-Evil", value=b"a\nBcc: x")), "does not fold"),
        (M(add_header=pb.AddHeader(name="X-Evil", value=b"a\rb")), "does not fold"),
        (M(add_header=pb.AddHeader(name="X-Evil", value=b"trailing\n")), "does not fold"),
        (M(add_header=pb.AddHeader(name="X-Nul", value=b"a\0b")), "NUL"),
        (M(add_header=pb.AddHeader(name="Bad Name", value=b"x")), "not a header name"),
        (M(add_header=pb.AddHeader(name="Bad:Name", value=b"x")), "not a header name"),
        (M(add_header=pb.AddHeader(name="", value=b"x")), "not a header name"),
        (M(add_header=pb.AddHeader(name="X-Big", value=b"x" * 70000)), "exceeds"),
        (M(change_header=pb.ChangeHeader(name="Subject", index=0, value=b"x")), "counts from 1"),
        (M(change_header=pb.ChangeHeader(name="Subject", index=1, value=b"")), "delete_header"),
        (M(delete_header=pb.DeleteHeader(name="Subject", index=0)), "counts from 1"),
        (M(add_recipient=pb.AddRecipient(address="")), "empty"),
        (M(add_recipient=pb.AddRecipient(address="<a@x>\r\nRCPT TO:<b@x>")), "forbidden"),
        (M(add_recipient=pb.AddRecipient(address="<a@x>", esmtp_args=["A B"])), "forbidden"),
        (M(change_sender=pb.ChangeSender(address="<a\0@x>")), "forbidden"),
        (M(quarantine=pb.Quarantine(reason="")), "empty"),
        (M(delete_recipient=pb.DeleteRecipient(address_raw=b"<a@x>\n")), "NUL, CR or LF"),
        (M(add_header=pb.AddHeader(name="X", value=b"\n leading fold")), "does not fold"),
        (M(add_header=pb.AddHeader(name="X", value=b"a\n \n b")), "empty folded line"),
        (M(add_header=pb.AddHeader(name="X", value=b"a\n ")), "empty folded line"),
        (M(add_header=pb.AddHeader(name="X", value=b"bell\x07")), "control characters"),
        (M(add_header=pb.AddHeader(name="X", value=b"del\x7f")), "control characters"),
        (M(), "nothing set"),
    ],
)
def test_invalid_modifications_are_refused(mod: pb.Modification, problem: str) -> None:
    with pytest.raises(InvalidAnswer, match=problem):
        finish([mod])


def test_two_body_replacements_are_refused() -> None:
    body = M(replace_body=pb.ReplaceBody(body=b"x"))
    with pytest.raises(InvalidAnswer, match="more than one replace_body"):
        finish([body, body])


@pytest.mark.parametrize(
    ("allowed", "mod"),
    [
        ("add_header", M(add_header=pb.AddHeader(name="X", value=b"1"))),
        ("add_header", M(insert_header=pb.InsertHeader(name="X", value=b"1"))),
        ("change_header", M(change_header=pb.ChangeHeader(name="X", index=1, value=b"1"))),
        ("change_header", M(delete_header=pb.DeleteHeader(name="X", index=1))),
        ("add_recipient", M(add_recipient=pb.AddRecipient(address="<a@x>"))),
        (
            "add_recipient_with_args",
            M(add_recipient=pb.AddRecipient(address="<a@x>", esmtp_args=["X=1"])),
        ),
        ("delete_recipient", M(delete_recipient=pb.DeleteRecipient(address="<a@x>"))),
        ("replace_body", M(replace_body=pb.ReplaceBody(body=b"x"))),
        ("change_sender", M(change_sender=pb.ChangeSender(address="<a@x>"))),
        ("quarantine", M(quarantine=pb.Quarantine(reason="x"))),
    ],
)
def test_modification_needs_its_action(allowed: str, mod: pb.Modification) -> None:
    caps = h.capabilities(h.DECIDE, actions=pb.Actions(**{allowed: True}))
    finish([mod], caps)  # granted: fine
    # ADDRCPT_PAR can add a recipient without arguments too (smfi_addrcpt_par with NULL).
    siblings = {allowed, "add_recipient_with_args"} if allowed == "add_recipient" else {allowed}
    others = pb.Actions(**{f.name: f.name not in siblings for f in pb.Actions.DESCRIPTOR.fields})
    with pytest.raises(InvalidAnswer, match="which was not negotiated"):
        finish([mod], h.capabilities(h.DECIDE, actions=others))


def test_action_the_mta_did_not_offer_is_refused() -> None:
    mta = h.Mta(
        h.decide_everything(), cmd.OptionNegotiation(6, ActionFlag(0x0F), ProtocolFlag(0x1FFFFF))
    )
    assert mta.session.negotiation is not None
    assert not mta.session.negotiation.negotiated.actions.change_sender
    mta.send(*h.connect())
    for commands in (h.mail(), h.rcpt(), h.eom()):
        mta.verdict(pb.ACTION_CONTINUE)
        mta.send(*commands)
    answer = pb.EndOfMessageResponse(
        modifications=[M(change_sender=pb.ChangeSender(address="<a@x>"))],
        verdict=pb.Verdict(action=pb.ACTION_CONTINUE),
    )
    with pytest.raises(InvalidAnswer, match="SMFIF_CHGFROM, which was not negotiated"):
        mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=answer))


def test_end_of_message_answer_needs_a_verdict() -> None:
    mta = at(Stage.EOM)
    with pytest.raises(InvalidAnswer, match="no verdict"):
        mta.answer(
            pb.ProcessResponse(
                sequence=mta.pending_sequence(), end_of_message=pb.EndOfMessageResponse()
            )
        )
    finish_skip = pb.EndOfMessageResponse(verdict=pb.Verdict(action=pb.ACTION_SKIP))
    with pytest.raises(InvalidAnswer, match="SKIP is only valid"):
        mta.answer(pb.ProcessResponse(sequence=mta.pending_sequence(), end_of_message=finish_skip))


def test_add_recipient_with_only_addrcpt_par_granted() -> None:
    caps = h.capabilities(h.DECIDE, actions=pb.Actions(add_recipient_with_args=True))
    mod = M(add_recipient=pb.AddRecipient(address="<a@x>"))
    assert finish([mod], caps)[0] == r.AddRecipientWithArgs(b"<a@x>", None)


def test_eight_bit_header_values_pass_unchanged() -> None:
    value = "Grüße\n\tnext".encode()
    assert finish([M(add_header=pb.AddHeader(name="X", value=value))])[0] == r.AddHeader(
        b"X", value
    )
