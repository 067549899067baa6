"""Option negotiation: exactly what the capabilities need, never more than the MTA offered."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milter_bridge.protocol import MalformedPacket, ReplyDecoder
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, MacroStage, ProtocolFlag
from milter_bridge.session import InvalidCapabilitiesError, Plan
from milter_bridge.session.negotiation import negotiate
from milter_bridge.v1 import policy_pb2 as pb
from tests.session.harness import (
    ALL_ACTIONS,
    DECIDE,
    OBSERVE,
    OFFER_V6,
    SKIP,
    Mta,
    capabilities,
    decide_everything,
    eom_only,
)

P = ProtocolFlag
NR_ALL = (
    P.SMFIP_NR_CONN
    | P.SMFIP_NR_HELO
    | P.SMFIP_NR_MAIL
    | P.SMFIP_NR_RCPT
    | P.SMFIP_NR_DATA
    | P.SMFIP_NR_UNKN
    | P.SMFIP_NR_HDR
    | P.SMFIP_NR_EOH
    | P.SMFIP_NR_BODY
)


def reply_to(
    caps: pb.Capabilities, offer: cmd.OptionNegotiation = OFFER_V6
) -> r.OptionNegotiationReply:
    (reply,) = Mta(caps, offer).optneg
    assert isinstance(reply, r.OptionNegotiationReply)
    return reply


def test_end_of_message_only_policy() -> None:
    reply = reply_to(eom_only())
    assert reply.version == 6
    # The envelope, headers and body are collected without the MTA waiting (NR_*);
    # DATA, EOH and UNKNOWN are not needed at all (NO*).
    assert reply.protocol == (
        P.SMFIP_NR_CONN
        | P.SMFIP_NR_HELO
        | P.SMFIP_NR_MAIL
        | P.SMFIP_NR_RCPT
        | P.SMFIP_NR_HDR
        | P.SMFIP_NR_BODY
        | P.SMFIP_NODATA
        | P.SMFIP_NOEOH
        | P.SMFIP_NOUNKNOWN
    )
    assert reply.protocol == 0x8F3C0
    assert reply.actions == 0xFF
    assert reply.macros == ()


def test_end_of_message_only_without_content_switches_everything_off() -> None:
    reply = reply_to(capabilities(end_of_message=DECIDE))
    assert reply.protocol == 0x37F  # every NO* flag
    assert reply.actions == ActionFlag.NONE


def test_observe_only_policy() -> None:
    reply = reply_to(capabilities(OBSERVE, header_delivery=pb.HEADER_DELIVERY_EACH))
    assert reply.protocol == NR_ALL
    assert reply.actions == ActionFlag.NONE


def test_policy_deciding_at_every_stage() -> None:
    reply = reply_to(decide_everything())
    assert reply.protocol == P.SMFIP_SKIP  # nothing left out, everything answered
    assert reply.actions == 0xFF


def test_macro_lists_with_and_without_braces() -> None:
    macros = pb.MacroRequest(
        connect=["j", "{daemon_name}", "{j}"], rcpt_to=["rcpt_addr"], end_of_message=["{i}"]
    )
    reply = reply_to(capabilities(connect=DECIDE, end_of_message=DECIDE, macros=macros))
    assert reply.actions & ActionFlag.SMFIF_SETSYMLIST
    assert reply.macros == (
        (MacroStage.SMFIM_CONNECT, b"j {daemon_name}"),
        (MacroStage.SMFIM_ENVRCPT, b"{rcpt_addr}"),
        (MacroStage.SMFIM_EOM, b"i"),
        (MacroStage.SMFIM_EOH, b""),  # Sendmail's default, sent so that it uses the EOM list
    )


def optneg_bytes(caps: pb.Capabilities) -> bytes:
    """The one packet a Session writes for Postfix's / Sendmail's OPTNEG, undecoded."""
    (packet,) = Mta(caps, offer=None).writes(OFFER_V6)
    return packet


def symlist(stage: MacroStage, names: bytes) -> bytes:
    return struct.pack(">I", stage) + names + b"\0"


def test_end_of_message_macros_alone_go_with_sendmails_end_of_headers_default() -> None:
    # Sendmail uses a milter's EOM list only when it also sent an EOH list.
    caps = capabilities(
        end_of_message=DECIDE, macros=pb.MacroRequest(end_of_message=["i", "{msg_id}"])
    )
    packet = optneg_bytes(caps)
    (reply,) = ReplyDecoder().feed(packet)
    assert isinstance(reply, r.OptionNegotiationReply)
    assert reply.actions & ActionFlag.SMFIF_SETSYMLIST
    lists = symlist(MacroStage.SMFIM_EOM, b"i {msg_id}") + symlist(MacroStage.SMFIM_EOH, b"")
    # length, 'O', version, actions, protocol, then the lists (EOM = 5 before EOH = 6)
    assert (
        packet
        == struct.pack(">IcIII", 13 + len(lists), b"O", 6, reply.actions, reply.protocol) + lists
    )


def test_end_of_headers_macros_alone_go_with_sendmails_end_of_message_default() -> None:
    caps = capabilities(end_of_headers=DECIDE, macros=pb.MacroRequest(end_of_headers=["i", "j"]))
    packet = optneg_bytes(caps)
    lists = symlist(MacroStage.SMFIM_EOM, b"{msg_id}") + symlist(MacroStage.SMFIM_EOH, b"i j")
    assert packet.endswith(lists)
    (reply,) = ReplyDecoder().feed(packet)
    assert isinstance(reply, r.OptionNegotiationReply)
    assert reply.macros == ((MacroStage.SMFIM_EOM, b"{msg_id}"), (MacroStage.SMFIM_EOH, b"i j"))


def test_both_message_stages_named_are_sent_as_named() -> None:
    macros = pb.MacroRequest(end_of_headers=["{eoh_x}"], end_of_message=["i"])
    reply = reply_to(capabilities(end_of_message=DECIDE, macros=macros))
    assert reply.macros == ((MacroStage.SMFIM_EOM, b"i"), (MacroStage.SMFIM_EOH, b"{eoh_x}"))


def test_lists_without_a_message_stage_add_no_end_of_headers_or_message_list() -> None:
    reply = reply_to(capabilities(connect=DECIDE, macros=pb.MacroRequest(connect=["j"])))
    assert reply.macros == ((MacroStage.SMFIM_CONNECT, b"j"),)


def test_macro_lists_only_when_the_mta_offers_setsymlist() -> None:
    macros = pb.MacroRequest(connect=["j"])
    offer = cmd.OptionNegotiation(6, ActionFlag(0xFF), P(0x1FFFFF))
    mta = Mta(capabilities(connect=DECIDE, macros=macros), offer)
    (reply,) = mta.optneg
    assert isinstance(reply, r.OptionNegotiationReply)
    assert reply.macros == ()
    assert not reply.actions & ActionFlag.SMFIF_SETSYMLIST
    assert mta.session.negotiation is not None
    assert not mta.session.negotiation.negotiated.macro_lists


def test_version_2_offer_from_postfix() -> None:
    # Postfix with milter_protocol=2 offers version 2, actions 0x1FF, protocol 0x7F.
    offer = cmd.OptionNegotiation(2, ActionFlag(0x1FF), P(0x7F))
    reply = reply_to(eom_only(), offer)
    assert reply.version == 2
    # Only NOEOH is both needed and offered; no NR* exists in version 2.
    assert reply.protocol == P.SMFIP_NOEOH


def test_version_2_zero_flags_mean_version_1_defaults() -> None:
    offer = cmd.OptionNegotiation(2, ActionFlag(0), P(0))
    reply = reply_to(eom_only(), offer)
    assert reply.actions == 0x0F  # SMFI_V1_ACTS
    assert reply.protocol == P.NONE  # NOEOH is not among SMFI_V1_PROT


def test_version_2_events_it_lacks_are_skip_for_the_policy() -> None:
    mta = Mta(decide_everything(), cmd.OptionNegotiation(2, ActionFlag(0x1FF), P(0x7F)))
    negotiation = mta.session.negotiation
    assert negotiation is not None
    events = negotiation.negotiated.events
    assert (events.data, events.unknown) == (SKIP, SKIP)
    assert events.end_of_message == DECIDE
    assert not negotiation.negotiated.skip  # SMFIP_SKIP is not among 0x7F


def test_higher_version_is_answered_with_6() -> None:
    assert (
        reply_to(eom_only(), cmd.OptionNegotiation(7, ActionFlag(0x1FF), P(0x1FFFFF))).version == 6
    )


def test_version_1_is_refused() -> None:
    plan = Plan.from_capabilities(eom_only())
    with pytest.raises(MalformedPacket, match="version 1"):
        negotiate(plan, cmd.OptionNegotiation(1, ActionFlag(0x1FF), P(0x1FFFFF)))


def test_leading_space_and_rejected_recipients_on_request() -> None:
    caps = capabilities(
        rcpt_to=OBSERVE, header=OBSERVE, header_leading_space=True, rejected_recipients=True
    )
    reply = reply_to(caps)
    assert reply.protocol & P.SMFIP_HDR_LEADSPC
    assert reply.protocol & P.SMFIP_RCPT_REJ
    assert not reply_to(capabilities(header=OBSERVE)).protocol & P.SMFIP_HDR_LEADSPC


@given(
    st.integers(2, 6),
    st.integers(0, 0x1FF).map(ActionFlag),
    st.integers(0, 0x1FFFFF).map(P),
    st.sampled_from([eom_only(), decide_everything(), capabilities(OBSERVE)]),
)
def test_never_more_than_offered(
    version: int, actions: ActionFlag, protocol: ProtocolFlag, caps: pb.Capabilities
) -> None:
    offer = cmd.OptionNegotiation(version, actions, protocol)
    reply = negotiate(Plan.from_capabilities(caps), offer).reply
    assert reply.version == version
    assert reply.actions & ~(actions or 0x0F) == 0
    assert reply.protocol & ~(protocol or 0x3F) == 0


@pytest.mark.parametrize(
    ("caps", "message"),
    [
        (pb.Capabilities(), "events is missing"),
        (
            pb.Capabilities(events=pb.EventModes(connect=DECIDE)),
            "events.helo is EVENT_MODE_UNSPECIFIED",
        ),
        (capabilities(abort=DECIDE), "abort cannot be DECIDE"),
        (capabilities(header=OBSERVE, header_delivery=0), "header_delivery"),
        (capabilities(body=OBSERVE, body_delivery=pb.BODY_DELIVERY_NONE), "events.body"),
        (capabilities(body_delivery=pb.BODY_DELIVERY_STREAM), "events.body"),
        (capabilities(body_delivery=0), "body_delivery"),
        # Proto3 enums are open: a number the enum does not name is refused too.
        (capabilities(body_delivery=9), "body_delivery is 9; set NONE"),
        (capabilities(body_delivery=pb.BODY_DELIVERY_BUFFERED), "end_of_message is SKIP"),
        (capabilities(end_of_message=OBSERVE, actions=ALL_ACTIONS), "actions need"),
        (
            capabilities(connect=DECIDE, macros=pb.MacroRequest(connect=["bad name"])),
            "not a macro name",
        ),
    ],
)
def test_invalid_capabilities_name_the_field(caps: pb.Capabilities, message: str) -> None:
    with pytest.raises(InvalidCapabilitiesError, match=message):
        Plan.from_capabilities(caps)


def test_rejected_recipients_keep_rcpt_mailer_in_a_custom_list() -> None:
    caps = capabilities(
        rcpt_to=DECIDE, rejected_recipients=True, macros=pb.MacroRequest(rcpt_to=["rcpt_addr"])
    )
    assert (MacroStage.SMFIM_ENVRCPT, b"{rcpt_addr} {rcpt_mailer}") in reply_to(caps).macros
