"""Replies and modification actions a milter sends to the MTA, one frozen dataclass each.

Same shape as commands.py: ``code``, ``payload()``, ``parse(payload)``;
fields hold the exact wire bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Self

from milter_bridge.protocol import constants as c
from milter_bridge.protocol.constants import ActionFlag, MacroStage, ProtocolFlag
from milter_bridge.protocol.wire import Reader, cstr, u32


@dataclass(frozen=True, slots=True)
class OptionNegotiationReply:
    """SMFIC_OPTNEG sent back: what the milter asks for, plus optional macro lists.

    ``macros`` are (stage, space-separated names) in wire order; MTAs honour
    them only when SMFIF_SETSYMLIST is among the actions.
    """

    code: ClassVar[bytes] = c.SMFIC_OPTNEG
    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    macros: tuple[tuple[MacroStage, bytes], ...] = ()

    def payload(self) -> bytes:
        head = u32(self.version) + u32(self.actions) + u32(self.protocol)
        return head + b"".join(u32(stage) + cstr(names) for stage, names in self.macros)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "OPTNEG reply")
        version, actions, protocol = r.u32(), r.u32(), r.u32()
        macros = []
        while not r.at_end():
            stage = r.u32()
            if stage not in MacroStage._value2member_map_:
                raise r.error(f"unknown macro stage {stage}")
            macros.append((MacroStage(stage), r.cstr()))
        return cls(version, ActionFlag(actions), ProtocolFlag(protocol), tuple(macros))


@dataclass(frozen=True, slots=True)
class _Bare:
    """A reply that carries nothing."""

    code: ClassVar[bytes]

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        Reader(payload, f"reply {cls.code!r}").end()
        return cls()


@dataclass(frozen=True, slots=True)
class Continue(_Bare):
    """SMFIR_CONTINUE."""

    code: ClassVar[bytes] = c.SMFIR_CONTINUE


@dataclass(frozen=True, slots=True)
class Accept(_Bare):
    """SMFIR_ACCEPT."""

    code: ClassVar[bytes] = c.SMFIR_ACCEPT


@dataclass(frozen=True, slots=True)
class Reject(_Bare):
    """SMFIR_REJECT."""

    code: ClassVar[bytes] = c.SMFIR_REJECT


@dataclass(frozen=True, slots=True)
class TempFail(_Bare):
    """SMFIR_TEMPFAIL."""

    code: ClassVar[bytes] = c.SMFIR_TEMPFAIL


@dataclass(frozen=True, slots=True)
class Discard(_Bare):
    """SMFIR_DISCARD."""

    code: ClassVar[bytes] = c.SMFIR_DISCARD


@dataclass(frozen=True, slots=True)
class Skip(_Bare):
    """SMFIR_SKIP: no more body chunks for this message (only if SMFIP_SKIP was negotiated)."""

    code: ClassVar[bytes] = c.SMFIR_SKIP


@dataclass(frozen=True, slots=True)
class Progress(_Bare):
    """SMFIR_PROGRESS: still working on end of message; resets the MTA's read timeout."""

    code: ClassVar[bytes] = c.SMFIR_PROGRESS


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """SMFIR_REPLYCODE: a whole SMTP reply, e.g. b"550 5.7.1 no" or multi-line with CRLF."""

    code: ClassVar[bytes] = c.SMFIR_REPLYCODE
    text: bytes

    def payload(self) -> bytes:
        return cstr(self.text)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "REPLYCODE")
        text = r.cstr()
        r.end()
        return cls(text)


@dataclass(frozen=True, slots=True)
class AddHeader:
    """SMFIR_ADDHEADER: append a header."""

    code: ClassVar[bytes] = c.SMFIR_ADDHEADER
    name: bytes
    value: bytes

    def payload(self) -> bytes:
        return cstr(self.name) + cstr(self.value)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "ADDHEADER")
        name, value = r.cstr(), r.cstr()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class _IndexedHeader:
    """A header action with a 32-bit index before name and value."""

    code: ClassVar[bytes]
    index: int
    name: bytes
    value: bytes

    def payload(self) -> bytes:
        return u32(self.index) + cstr(self.name) + cstr(self.value)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, f"reply {cls.code!r}")
        index, name, value = r.u32(), r.cstr(), r.cstr()
        r.end()
        return cls(index, name, value)


@dataclass(frozen=True, slots=True)
class InsertHeader(_IndexedHeader):
    """SMFIR_INSHEADER: insert a header at a 0-based position."""

    code: ClassVar[bytes] = c.SMFIR_INSHEADER


@dataclass(frozen=True, slots=True)
class ChangeHeader(_IndexedHeader):
    """SMFIR_CHGHEADER: change occurrence ``index`` (from 1) of a header; empty value deletes."""

    code: ClassVar[bytes] = c.SMFIR_CHGHEADER


@dataclass(frozen=True, slots=True)
class _OneString:
    code: ClassVar[bytes]
    value: bytes

    def payload(self) -> bytes:
        return cstr(self.value)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, f"reply {cls.code!r}")
        value = r.cstr()
        r.end()
        return cls(value)


@dataclass(frozen=True, slots=True)
class AddRecipient(_OneString):
    """SMFIR_ADDRCPT: add a recipient."""

    code: ClassVar[bytes] = c.SMFIR_ADDRCPT


@dataclass(frozen=True, slots=True)
class DeleteRecipient(_OneString):
    """SMFIR_DELRCPT: delete a recipient."""

    code: ClassVar[bytes] = c.SMFIR_DELRCPT


@dataclass(frozen=True, slots=True)
class Quarantine(_OneString):
    """SMFIR_QUARANTINE: quarantine the message with a reason."""

    code: ClassVar[bytes] = c.SMFIR_QUARANTINE


@dataclass(frozen=True, slots=True)
class _AddressWithArgs:
    """An address and an optional ESMTP argument string (absent, not empty, when None)."""

    code: ClassVar[bytes]
    address: bytes
    args: bytes | None = None

    def payload(self) -> bytes:
        return cstr(self.address) + (b"" if self.args is None else cstr(self.args))

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, f"reply {cls.code!r}")
        address = r.cstr()
        args = None if r.at_end() else r.cstr()
        r.end()
        return cls(address, args)


@dataclass(frozen=True, slots=True)
class AddRecipientWithArgs(_AddressWithArgs):
    """SMFIR_ADDRCPT_PAR: add a recipient with ESMTP arguments (v6)."""

    code: ClassVar[bytes] = c.SMFIR_ADDRCPT_PAR


@dataclass(frozen=True, slots=True)
class ChangeSender(_AddressWithArgs):
    """SMFIR_CHGFROM: change the envelope sender, optionally with ESMTP arguments (v6)."""

    code: ClassVar[bytes] = c.SMFIR_CHGFROM


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """SMFIR_REPLBODY: one piece (at most 65535 bytes) of the replacement body."""

    code: ClassVar[bytes] = c.SMFIR_REPLBODY
    chunk: bytes

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(payload)


MilterReply = (
    OptionNegotiationReply
    | Continue
    | Accept
    | Reject
    | TempFail
    | Discard
    | Skip
    | Progress
    | ReplyCode
    | AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRecipient
    | AddRecipientWithArgs
    | DeleteRecipient
    | ChangeSender
    | ReplaceBody
    | Quarantine
)

REPLY_PARSERS: dict[bytes, Callable[[bytes], MilterReply]] = {
    cls.code: cls.parse
    for cls in (
        OptionNegotiationReply,
        Continue,
        Accept,
        Reject,
        TempFail,
        Discard,
        Skip,
        Progress,
        ReplyCode,
        AddHeader,
        InsertHeader,
        ChangeHeader,
        AddRecipient,
        AddRecipientWithArgs,
        DeleteRecipient,
        ChangeSender,
        ReplaceBody,
        Quarantine,
    )
}
