"""Option negotiation: from a Plan and the MTA's offer to the OPTNEG reply.

Asks for exactly what the plan needs and never more than the MTA offered:
NO* flags for events nothing needs, NR* flags for events the policy does not
answer, the action flags of the modifications the policy may make, and the
macro lists (end of headers and end of message always as a pair, for
Sendmail). Sendmail refuses a reply with flags it did not offer; Postfix takes
them at face value, which is worse (see PROTOCOL-NOTES).
"""

from __future__ import annotations

from dataclasses import dataclass

from milter_bridge.protocol.commands import OptionNegotiation
from milter_bridge.protocol.constants import (
    SMFI_PROT_VERSION,
    SMFI_PROT_VERSION_MIN,
    SMFI_V1_ACTS,
    SMFI_V1_PROT,
    ActionFlag,
    MacroStage,
    ProtocolFlag,
)
from milter_bridge.protocol.errors import MalformedPacket
from milter_bridge.protocol.replies import OptionNegotiationReply
from milter_bridge.session.plan import Plan, flags_to_actions
from milter_bridge.session.stages import FIRST_VERSION, NO_FLAG, NR_FLAG, Mode, Stage
from milter_bridge.v1 import policy_pb2 as pb

P = ProtocolFlag

# Per stage, from stages.py: the flag that stops the MTA sending it, the flag that
# stops it waiting, and the first protocol version that has it.

# Sendmail 8.14-8.18 picks a milter's end-of-message macro list by the flag of
# its end-of-headers list (milter.c, milter_data(): ``if ((m->mf_lflags &
# MI_LFLAGS_SYM(SMFIM_EOH)) != 0) idx = m->mf_idx; ... macros =
# MilterMacros[SMFIM_EOM][idx];``). An EOM list sent alone is ignored: the
# milter gets the global Milter.macros.eom. An EOH list sent alone makes the
# milter's own, never set, EOM list the one used: no EOM macros at all. So the
# two always go together; the one the policy did not name gets Sendmail's stock
# default, the value cf/m4/cfhead.m4 gives Milter.macros.* (8.17.1.9:
# confMILTER_MACROS_EOM is `{msg_id}`; there is no confMILTER_MACROS_EOH, so the
# default end-of-headers list is empty). Postfix (milter8.c) takes each list on
# its own and uses an empty one as "this milter has none", so its
# milter_end_of_header_macros still applies (milter.c, MILTER_MACRO_EVAL); a
# non-empty one replaces its milter_*_macros for this milter, so `{msg_id}`
# (which Postfix does not define) leaves an end-of-headers-only policy without
# end-of-message macros there, where milter_end_of_data_macros would give `i`.
SENDMAIL_DEFAULT_LIST: dict[MacroStage, bytes] = {
    MacroStage.SMFIM_EOH: b"",
    MacroStage.SMFIM_EOM: b"{msg_id}",
}


def symbol_lists(
    requested: tuple[tuple[MacroStage, bytes], ...],
) -> tuple[tuple[MacroStage, bytes], ...]:
    """The OPTNEG macro lists for the policy's: EOH and EOM both, whenever either is named."""
    lists = dict(requested)
    if lists.keys() & SENDMAIL_DEFAULT_LIST.keys():
        for stage, default in SENDMAIL_DEFAULT_LIST.items():
            lists.setdefault(stage, default)
    return tuple(sorted(lists.items()))


@dataclass(frozen=True, slots=True)
class Negotiation:
    """The outcome of OPTNEG for one MTA connection."""

    reply: OptionNegotiationReply
    # Stages the MTA does not wait on (NR negotiated): the bridge never answers them.
    no_reply: frozenset[Stage]
    # Stages the policy sees, with their effective mode (SKIP where the MTA cannot send it).
    modes: dict[Stage, Mode]
    # Whether the MTA understands SMFIR_SKIP.
    skip: bool
    # The modifications the MTA granted.
    actions: ActionFlag
    negotiated: pb.Negotiated

    @property
    def version(self) -> int:
        return self.reply.version


def negotiate(plan: Plan, offer: OptionNegotiation) -> Negotiation:
    """The reply to the MTA's OPTNEG; raises MalformedPacket for a version below 2.

    Computed once per plan and offer (``Plan.remember``): the sessions share it."""
    key = ("optneg", offer.version, offer.actions, offer.protocol)
    return plan.remember(key, lambda: _negotiate(plan, offer))


def _negotiate(plan: Plan, offer: OptionNegotiation) -> Negotiation:
    if offer.version < SMFI_PROT_VERSION_MIN:
        msg = f"OPTNEG: MTA offers protocol version {offer.version}, the minimum is 2"
        raise MalformedPacket(msg)
    version = min(SMFI_PROT_VERSION, offer.version)
    # libmilter: zero means the version-1 defaults.
    offered_actions = offer.actions or SMFI_V1_ACTS
    offered = offer.protocol or SMFI_V1_PROT

    modes = dict(plan.modes)
    for stage, first in FIRST_VERSION.items():
        if version < first:
            modes[stage] = Mode.SKIP

    protocol = P.NONE
    no_reply: set[Stage] = set()
    for stage, no_flag in NO_FLAG.items():
        if not plan.needs_from_mta(stage) and no_flag & offered:
            protocol |= no_flag
            continue
        if modes[stage] is not Mode.DECIDE and NR_FLAG[stage] & offered:
            protocol |= NR_FLAG[stage]
            no_reply.add(stage)

    skip = modes[Stage.BODY] is Mode.DECIDE and bool(P.SMFIP_SKIP & offered)
    if skip:
        protocol |= P.SMFIP_SKIP
    rejected = plan.rejected_recipients and bool(P.SMFIP_RCPT_REJ & offered)
    if rejected:
        protocol |= P.SMFIP_RCPT_REJ
    leadspc = plan.header_leading_space and bool(P.SMFIP_HDR_LEADSPC & offered)
    if leadspc:
        protocol |= P.SMFIP_HDR_LEADSPC

    actions = plan.actions & offered_actions
    # Macro lists need version 6 and SETSYMLIST; Postfix would parse them anyway.
    lists = bool(plan.macro_lists) and bool(ActionFlag.SMFIF_SETSYMLIST & offered_actions)
    lists = lists and version >= SMFI_PROT_VERSION
    if lists:
        actions |= ActionFlag.SMFIF_SETSYMLIST

    negotiated = pb.Negotiated(
        protocol_version=version,
        actions=flags_to_actions(actions),
        events=pb.EventModes(**{s.value: modes[s].value for s in Stage}),
        macro_lists=lists,
        rejected_recipients=rejected,
        header_leading_space=leadspc,
        skip=skip,
    )
    return Negotiation(
        reply=OptionNegotiationReply(
            version, actions, protocol, symbol_lists(plan.macro_lists) if lists else ()
        ),
        no_reply=frozenset(no_reply),
        modes=modes,
        skip=skip,
        actions=actions & ~ActionFlag.SMFIF_SETSYMLIST,
        negotiated=negotiated,
    )
