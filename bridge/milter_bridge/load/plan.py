"""What the MTA sends after one OPTNEG reply: which events, whether it waits, the packets.

Computed once per distinct OPTNEG reply and shared by every connection that got
it, so that a message costs little more than joining pre-encoded bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from milter_bridge.load.macros import (
    CLIENT_ADDR,
    CLIENT_NAME,
    SESSION_VALUES,
    MacroLists,
    MacroPacket,
)
from milter_bridge.load.shape import MESSAGE_ID_INDEX, SENDER, SUBJECT_INDEX, Shape
from milter_bridge.load.verdicts import Stage
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import encode
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import (
    MILTER_CHUNK_SIZE,
    SMFIA_INET,
    ActionFlag,
    ProtocolFlag,
)

P = ProtocolFlag
# What Postfix 3.7 offers with milter_protocol=6 (tests/fixtures/captured).
OFFER = cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF))
OFFER_PACKET = encode(OFFER)
ABORT_PACKET = encode(cmd.Abort())
QUIT_PACKET = encode(cmd.Quit())


@dataclass(frozen=True, slots=True)
class Event:
    """How the MTA handles one kind of event on this negotiation."""

    sent: bool  # the event itself goes out (no NO* flag, exists in this version)
    waits: bool  # the MTA waits for its answer (no NR* flag)
    macros: bool  # a D packet goes out before it


def check(reply: r.OptionNegotiationReply) -> tuple[str, list[str]]:
    """A problem after which Postfix drops the milter (or ""), and tolerated problems."""
    if not 2 <= reply.version <= OFFER.version:
        return f"OPTNEG reply with version {reply.version}: the MTA offered 2..6", []
    # Plain ints: the complement of an IntFlag covers only its named members.
    if extra := int(reply.actions) & ~int(OFFER.actions):
        return f"OPTNEG reply asks for actions 0x{extra:X} that were not offered", []
    problems = []
    if extra := int(reply.protocol) & ~int(OFFER.protocol):
        problems.append(f"OPTNEG reply asks for protocol flags 0x{extra:X} that were not offered")
    if reply.macros and not reply.actions & ActionFlag.SMFIF_SETSYMLIST:
        problems.append("OPTNEG reply carries macro lists without SMFIF_SETSYMLIST")
    return "", problems


class Plan:
    """The negotiated flags of one OPTNEG reply and the packets of a message."""

    def __init__(self, reply: r.OptionNegotiationReply, shape: Shape) -> None:
        self.reply = reply
        self.fatal, self.problems = check(reply)
        proto = reply.protocol
        self.actions = reply.actions
        self.skip = bool(proto & P.SMFIP_SKIP)
        self.lists = MacroLists(reply.macros)

        def event(no: P, nr: P, *, exists: bool = True, macros_when_off: bool = True) -> Event:
            sent = exists and not proto & no
            return Event(sent, sent and not proto & nr, exists and (sent or macros_when_off))

        # Postfix sends the D packet of C, H, M, R, T even when the milter opted out of
        # the event (not of L, N, B); nothing at all for events its version lacks.
        self.connect = event(P.SMFIP_NOCONNECT, P.SMFIP_NR_CONN)
        self.helo = event(P.SMFIP_NOHELO, P.SMFIP_NR_HELO)
        self.mail = event(P.SMFIP_NOMAIL, P.SMFIP_NR_MAIL)
        self.rcpt = event(P.SMFIP_NORCPT, P.SMFIP_NR_RCPT)
        self.data = event(P.SMFIP_NODATA, P.SMFIP_NR_DATA, exists=reply.version >= 4)
        self.header = event(P.SMFIP_NOHDRS, P.SMFIP_NR_HDR, macros_when_off=False)
        self.eoh = event(P.SMFIP_NOEOH, P.SMFIP_NR_EOH, macros_when_off=False)
        self.body = event(P.SMFIP_NOBODY, P.SMFIP_NR_BODY, macros_when_off=False)
        self._build(shape, leading_space=bool(proto & P.SMFIP_HDR_LEADSPC))
        self._session_macros: tuple[bytes, bytes] | None = None  # D C and D H
        self._port_in_macros = any(self.lists.uses(c, b"client_port") for c in (b"C", b"H"))
        self.helo_packet = encode(cmd.Helo(CLIENT_NAME))
        # Where a message can be abandoned (abandon.py): after an event that is sent.
        self.abandon_points = tuple(
            stage
            for stage, sent in (
                (Stage.MAIL, self.mail.sent),
                (Stage.RCPT, self.rcpt.sent),
                (Stage.DATA, self.data.sent),
                (Stage.HEADER, self.header.sent and bool(self.headers)),
                (Stage.EOH, self.eoh.sent),
                (Stage.BODY, self.body.sent and bool(self.body_packets)),
                (Stage.EOM, True),
            )
            if sent
        )

    def _build(self, shape: Shape, *, leading_space: bool) -> None:
        fields = shape.header_fields()
        body_chunks = shape.body_chunks(MILTER_CHUNK_SIZE)
        size = sum(len(n) + len(v) + 4 for n, v in fields) + shape.body_size
        values = dict(SESSION_VALUES)
        self.mail_packets = self.lists.packet(b"M", values).packet(b"")
        if self.mail.sent:
            self.mail_packets += encode(cmd.Mail(b"<" + SENDER + b">", (b"SIZE=%d" % size,)))
        self.recipients: list[tuple[MacroPacket, bytes]] = []
        for n in range(shape.recipients):
            values[b"rcpt_addr"] = shape.recipient(n)
            rcpt = encode(cmd.Rcpt(b"<" + shape.recipient(n) + b">")) if self.rcpt.sent else b""
            self.recipients.append((self.lists.packet(b"R", values), rcpt))
        self.data_macros = self.lists.packet(b"T", values) if self.data.macros else None
        self.data_packet = encode(cmd.Data()) if self.data.sent else b""
        space = b" " if leading_space else b""
        self.headers = [encode(cmd.Header(n, space + v)) for n, v in fields]
        self.header_macros = self.lists.packet(b"L", values)
        self.subjects = (b"", b"")
        if len(fields) > SUBJECT_INDEX:
            marked = cmd.Header(fields[SUBJECT_INDEX][0], space + shape.marked_subject())
            self.subjects = (self.headers[SUBJECT_INDEX], encode(marked))
        self.message_id = len(fields) > MESSAGE_ID_INDEX
        self.message_id_prefix = space + b"<"
        self.eoh_packets = encode(cmd.EndOfHeaders()) if self.eoh.sent else b""
        self.eoh_macros = self.lists.packet(b"N", values)
        self.body_macros = self.lists.packet(b"B", values)
        self.body_packets = [encode(cmd.Body(chunk)) for chunk in body_chunks]
        self.eom_macros = self.lists.packet(b"E", values)

    def connect_packets(self, port: int) -> tuple[bytes, bytes]:
        """D C and C (when sent), then D H and H, for a client on ``port``."""
        macros = self._session_macros
        if macros is None or self._port_in_macros:
            values = dict(SESSION_VALUES)
            values[b"client_port"] = b"%d" % port
            macros = self._session_macros = (
                self.lists.packet(b"C", values).packet(b""),
                self.lists.packet(b"H", values).packet(b""),
            )
        connect, helo = macros
        if self.connect.sent:
            connect += encode(cmd.Connect(CLIENT_NAME, SMFIA_INET, port, CLIENT_ADDR))
        if self.helo.sent:
            helo += self.helo_packet
        return connect, helo

    def header_packets(self, queue_id: bytes, *, marked: bool) -> list[bytes]:
        """The header packets of one message (without their D packets)."""
        if not (marked or self.message_id):
            return self.headers
        headers = list(self.headers)
        if marked:
            headers[SUBJECT_INDEX] = self.subjects[1]
        if self.message_id:
            value = self.message_id_prefix + queue_id + b"@load.example.test>"
            headers[MESSAGE_ID_INDEX] = encode(cmd.Header(b"Message-ID", value))
        return headers
