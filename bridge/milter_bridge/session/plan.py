"""A policy's capabilities, validated once and turned into what the session needs.

``Plan.from_capabilities`` checks a DescribeResponse's Capabilities and
raises InvalidCapabilities naming the field that is wrong; the resulting Plan
says per stage whether the policy sees the event and whether it answers, and
which events the bridge must still take from the MTA to fill the
end-of-message event.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, TypeVar, cast

from milter_bridge.protocol.constants import ActionFlag, MacroStage
from milter_bridge.session.stages import MACRO_STAGES, Mode, Stage
from milter_bridge.v1 import policy_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.descriptor import EnumDescriptor


def enum_name(enum: EnumDescriptor, value: int) -> str:
    """The name of ``value`` in a proto enum, or the number itself: proto3 enums are
    open, so a policy may send a number the enum does not name (``Name`` raises then)."""
    named = enum.values_by_number.get(value)
    return str(value) if named is None else named.name


DEFAULT_BODY_LIMIT = 1 << 20
MAX_REMEMBERED = 64
_T = TypeVar("_T")


class InvalidCapabilitiesError(ValueError):
    """A policy's Capabilities cannot be used; the message names the field."""


class Body(Enum):
    NONE = pb.BODY_DELIVERY_NONE
    STREAM = pb.BODY_DELIVERY_STREAM
    BUFFERED = pb.BODY_DELIVERY_BUFFERED


# Actions fields -> the milter flag each needs.
ACTION_FLAGS: dict[str, ActionFlag] = {
    "add_header": ActionFlag.SMFIF_ADDHDRS,
    "change_header": ActionFlag.SMFIF_CHGHDRS,
    "replace_body": ActionFlag.SMFIF_CHGBODY,
    "add_recipient": ActionFlag.SMFIF_ADDRCPT,
    "add_recipient_with_args": ActionFlag.SMFIF_ADDRCPT_PAR,
    "delete_recipient": ActionFlag.SMFIF_DELRCPT,
    "change_sender": ActionFlag.SMFIF_CHGFROM,
    "quarantine": ActionFlag.SMFIF_QUARANTINE,
}


def macro_wire_name(name: str) -> str:
    """``{x}`` -> ``x`` for one-letter names, ``x`` -> ``{x}`` for longer ones (Sendmail's form)."""
    bare = name[1:-1] if name.startswith("{") and name.endswith("}") else name
    if not bare or any(ch.isspace() or ch in "{}\0" for ch in bare):
        msg = f"macros: {name!r} is not a macro name"
        raise InvalidCapabilitiesError(msg)
    return bare if len(bare) == 1 else "{" + bare + "}"


def actions_to_flags(actions: pb.Actions) -> ActionFlag:
    flags = ActionFlag.NONE
    for name, flag in ACTION_FLAGS.items():
        if getattr(actions, name):
            flags |= flag
    return flags


def flags_to_actions(flags: ActionFlag) -> pb.Actions:
    return pb.Actions(**{name: bool(flags & flag) for name, flag in ACTION_FLAGS.items()})


def _modes(events: pb.EventModes) -> dict[Stage, Mode]:
    modes: dict[Stage, Mode] = {}
    for stage in Stage:
        value = getattr(events, stage.value)
        if value == pb.EVENT_MODE_UNSPECIFIED:
            msg = f"events.{stage.value} is EVENT_MODE_UNSPECIFIED; set SKIP, OBSERVE or DECIDE"
            raise InvalidCapabilitiesError(msg)
        if value not in Mode._value2member_map_:
            msg = f"events.{stage.value} has the unknown value {value}"
            raise InvalidCapabilitiesError(msg)
        modes[stage] = Mode(value)
    if modes[Stage.ABORT] is Mode.DECIDE:
        msg = "events.abort cannot be DECIDE: an abort is never answered"
        raise InvalidCapabilitiesError(msg)
    return modes


@dataclass(frozen=True, slots=True)
class Plan:
    """What a policy wants, in the session's terms."""

    capabilities: pb.Capabilities
    fingerprint: str
    # Per stage: whether the policy sees the event and answers it. With batch
    # header delivery HEADER is SKIP here and EOH carries the headers.
    modes: dict[Stage, Mode]
    header_batch: bool
    body: Body
    body_limit: int
    eom_envelope: bool
    eom_headers: bool
    actions: ActionFlag
    macro_lists: tuple[tuple[MacroStage, bytes], ...]
    rejected_recipients: bool
    header_leading_space: bool
    # False for the stand-in used while no capabilities are known (see unavailable()).
    available: bool = True
    # What every session with this plan derives alike (``remember``).
    derived: dict[Hashable, object] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def remember(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """``make()``, computed once per plan and ``key`` and shared by the sessions
        (which never change it): the OPTNEG reply to each distinct offer, the states
        the MTA may skip. At most MAX_REMEMBERED keys: an MTA sends the same offer on
        every connection, and a stream of odd offers only empties it."""
        if key in self.derived:
            return cast(_T, self.derived[key])
        if len(self.derived) >= MAX_REMEMBERED:
            self.derived.clear()
        value = make()
        self.derived[key] = value
        return value

    @classmethod
    def unavailable(cls) -> Plan:
        """The minimum to negotiate when the policy's capabilities are unknown.

        Only CONNECT is asked for, so that the connect-stage failure action
        decides the session: tempfail defers it, reject refuses it, accept lets
        it through unfiltered (continue too: no other event is asked for).
        """
        modes = {stage.value: pb.EVENT_MODE_SKIP for stage in Stage}
        modes[Stage.CONNECT.value] = pb.EVENT_MODE_DECIDE
        caps = pb.Capabilities(events=pb.EventModes(**modes), body_delivery=pb.BODY_DELIVERY_NONE)
        plan = cls.from_capabilities(caps)
        return replace(plan, available=False)

    @classmethod
    def from_capabilities(cls, caps: pb.Capabilities, fingerprint: str = "") -> Plan:
        if not caps.HasField("events"):
            msg = "events is missing: every event needs a mode"
            raise InvalidCapabilitiesError(msg)
        modes = _modes(caps.events)
        header_batch = False
        if modes[Stage.HEADER] is not Mode.SKIP or modes[Stage.EOH] is not Mode.SKIP:
            if caps.header_delivery == pb.HEADER_DELIVERY_UNSPECIFIED:
                msg = "header_delivery is HEADER_DELIVERY_UNSPECIFIED; set EACH or BATCH"
                raise InvalidCapabilitiesError(msg)
            header_batch = caps.header_delivery == pb.HEADER_DELIVERY_BATCH
        if header_batch:
            strongest = max(modes[Stage.HEADER], modes[Stage.EOH], key=lambda m: m.value)
            modes[Stage.EOH] = strongest
            modes[Stage.HEADER] = Mode.SKIP
        if caps.body_delivery not in Body._value2member_map_:
            delivery = enum_name(pb.BodyDelivery.DESCRIPTOR, caps.body_delivery)
            msg = f"body_delivery is {delivery}; set NONE, STREAM or BUFFERED"
            raise InvalidCapabilitiesError(msg)
        body = Body(caps.body_delivery)
        if (body is Body.STREAM) != (modes[Stage.BODY] is not Mode.SKIP):
            msg = (
                "events.body must be OBSERVE or DECIDE with BODY_DELIVERY_STREAM and SKIP"
                f" otherwise (got {modes[Stage.BODY].name} with {body.name})"
            )
            raise InvalidCapabilitiesError(msg)
        eom = caps.end_of_message_content
        needs_eom = body is Body.BUFFERED or eom.envelope or eom.headers
        if needs_eom and modes[Stage.EOM] is Mode.SKIP:
            msg = "events.end_of_message is SKIP, but body or end_of_message_content asks for it"
            raise InvalidCapabilitiesError(msg)
        actions = actions_to_flags(caps.actions)
        if actions and modes[Stage.EOM] is not Mode.DECIDE:
            msg = "actions need events.end_of_message = DECIDE (modifications happen there)"
            raise InvalidCapabilitiesError(msg)
        lists = []
        for event, stage in MACRO_STAGES.items():
            names = [macro_wire_name(n) for n in getattr(caps.macros, event)]
            if names and event == "rcpt_to" and caps.rejected_recipients:
                # RcptTo.rejected is told by {rcpt_mailer}; a list replaces the MTA's default.
                names.append("{rcpt_mailer}")
            if names:
                lists.append((stage, " ".join(dict.fromkeys(names)).encode()))
        return cls(
            capabilities=caps,
            fingerprint=fingerprint,
            modes=modes,
            header_batch=header_batch,
            body=body,
            body_limit=caps.body_limit or DEFAULT_BODY_LIMIT,
            eom_envelope=eom.envelope,
            eom_headers=eom.headers,
            actions=actions,
            macro_lists=tuple(sorted(lists)),
            rejected_recipients=caps.rejected_recipients,
            header_leading_space=caps.header_leading_space,
        )

    def needs_from_mta(self, stage: Stage) -> bool:
        """Whether the MTA must send this event (to the policy or to fill end of message)."""
        if self.modes[stage] is not Mode.SKIP:
            return True
        if stage in (Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT):
            return self.eom_envelope
        if stage is Stage.HEADER:
            return self.eom_headers or (
                self.modes[Stage.EOH] is not Mode.SKIP and self.header_batch
            )
        if stage is Stage.BODY:
            return self.body is Body.BUFFERED
        return stage is Stage.EOM
