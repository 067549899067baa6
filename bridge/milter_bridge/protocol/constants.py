"""Milter protocol constants, named as in libmilter (mfdef.h, mfapi.h).

Values checked against sendmail 8.17's include/libmilter/mfdef.h and
Postfix's src/milter/milter8.c.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# The highest protocol version this implementation speaks (SMFI_PROT_VERSION).
SMFI_PROT_VERSION = 6
# Versions below this are refused, as libmilter does (SMFI_PROT_VERSION_MIN).
SMFI_PROT_VERSION_MIN = 2

# Largest body chunk either side sends in one BODY / REPLBODY packet.
MILTER_CHUNK_SIZE = 65535
# Bytes of the length prefix (MILTER_LEN_BYTES).
MILTER_LEN_BYTES = 4
# Length of the fixed part of OPTNEG: version, actions, protocol (MILTER_OPTLEN).
MILTER_OPTLEN = 3 * MILTER_LEN_BYTES


# Commands, MTA -> milter (SMFIC_*).
SMFIC_ABORT = b"A"  # abort the current message
SMFIC_BODY = b"B"  # a body chunk
SMFIC_CONNECT = b"C"  # connection information
SMFIC_MACRO = b"D"  # macros for the next command
SMFIC_BODYEOB = b"E"  # end of body (end of message)
SMFIC_HELO = b"H"  # HELO / EHLO
SMFIC_QUIT_NC = b"K"  # QUIT, but a new connection follows (v6)
SMFIC_HEADER = b"L"  # a header
SMFIC_MAIL = b"M"  # MAIL FROM
SMFIC_EOH = b"N"  # end of headers
SMFIC_OPTNEG = b"O"  # option negotiation
SMFIC_QUIT = b"Q"  # QUIT
SMFIC_RCPT = b"R"  # RCPT TO
SMFIC_DATA = b"T"  # DATA (v4)
SMFIC_UNKNOWN = b"U"  # an unknown SMTP command (v3)

# Replies and actions, milter -> MTA (SMFIR_*).
SMFIR_ADDRCPT = b"+"  # add recipient
SMFIR_DELRCPT = b"-"  # delete recipient
SMFIR_ADDRCPT_PAR = b"2"  # add recipient with ESMTP arguments (v6)
SMFIR_SHUTDOWN = b"4"  # 421: shutdown (internal to the MTA)
SMFIR_ACCEPT = b"a"  # accept
SMFIR_REPLBODY = b"b"  # replace body (a chunk of it)
SMFIR_CONTINUE = b"c"  # continue
SMFIR_DISCARD = b"d"  # discard
SMFIR_CHGFROM = b"e"  # change envelope sender (v6)
SMFIR_CONN_FAIL = b"f"  # cause a connection failure; no MTA implements it
SMFIR_ADDHEADER = b"h"  # add header
SMFIR_INSHEADER = b"i"  # insert header
SMFIR_SETSYMLIST = b"l"  # set list of symbols (internal to libmilter)
SMFIR_CHGHEADER = b"m"  # change header
SMFIR_PROGRESS = b"p"  # progress
SMFIR_QUARANTINE = b"q"  # quarantine
SMFIR_REJECT = b"r"  # reject
SMFIR_SKIP = b"s"  # skip the rest of the body (v6)
SMFIR_TEMPFAIL = b"t"  # tempfail
SMFIR_REPLYCODE = b"y"  # custom SMTP reply
# The OPTNEG reply uses the command code SMFIC_OPTNEG.

# CONNECT address families (SMFIA_*).
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"


class ActionFlag(IntFlag):
    """Modifications a milter may make (SMFIF_*), negotiated in OPTNEG."""

    NONE = 0
    SMFIF_ADDHDRS = 0x01
    SMFIF_CHGBODY = 0x02
    SMFIF_ADDRCPT = 0x04
    SMFIF_DELRCPT = 0x08
    SMFIF_CHGHDRS = 0x10
    SMFIF_QUARANTINE = 0x20
    SMFIF_CHGFROM = 0x40
    SMFIF_ADDRCPT_PAR = 0x80
    SMFIF_SETSYMLIST = 0x100


# Every action flag of protocol version 6 (what Postfix and Sendmail offer).
SMFI_V6_ACTS = ActionFlag(0x1FF)
# The action flags a version-2 MTA that sent 0 means (SMFI_V1_ACTS).
SMFI_V1_ACTS = (
    ActionFlag.SMFIF_ADDHDRS
    | ActionFlag.SMFIF_CHGBODY
    | ActionFlag.SMFIF_ADDRCPT
    | ActionFlag.SMFIF_DELRCPT
)


class ProtocolFlag(IntFlag):
    """Protocol steps to leave out or not to answer (SMFIP_*), negotiated in OPTNEG."""

    NONE = 0
    SMFIP_NOCONNECT = 0x01
    SMFIP_NOHELO = 0x02
    SMFIP_NOMAIL = 0x04
    SMFIP_NORCPT = 0x08
    SMFIP_NOBODY = 0x10
    SMFIP_NOHDRS = 0x20
    SMFIP_NOEOH = 0x40
    SMFIP_NR_HDR = 0x80
    SMFIP_NOUNKNOWN = 0x100
    SMFIP_NODATA = 0x200
    SMFIP_SKIP = 0x400
    SMFIP_RCPT_REJ = 0x800
    SMFIP_NR_CONN = 0x1000
    SMFIP_NR_HELO = 0x2000
    SMFIP_NR_MAIL = 0x4000
    SMFIP_NR_RCPT = 0x8000
    SMFIP_NR_DATA = 0x10000
    SMFIP_NR_UNKN = 0x20000
    SMFIP_NR_EOH = 0x40000
    SMFIP_NR_BODY = 0x80000
    SMFIP_HDR_LEADSPC = 0x100000
    SMFIP_MDS_256K = 0x10000000
    SMFIP_MDS_1M = 0x20000000


# The protocol flags a version-2 MTA that sent 0 means (SMFI_V1_PROT).
SMFI_V1_PROT = ProtocolFlag(0x3F)


class MacroStage(IntEnum):
    """Stages of the OPTNEG macro lists (SMFIM_*); note EOM comes before EOH."""

    SMFIM_CONNECT = 0
    SMFIM_HELO = 1
    SMFIM_ENVFROM = 2
    SMFIM_ENVRCPT = 3
    SMFIM_DATA = 4
    SMFIM_EOM = 5
    SMFIM_EOH = 6


# The command whose macros a DEFINE_MACRO packet carries, by stage. Postfix also
# sends macro packets for HEADER and BODY, which belong to no stage.
MACRO_STAGE_OF_COMMAND: dict[bytes, MacroStage] = {
    SMFIC_CONNECT: MacroStage.SMFIM_CONNECT,
    SMFIC_HELO: MacroStage.SMFIM_HELO,
    SMFIC_MAIL: MacroStage.SMFIM_ENVFROM,
    SMFIC_RCPT: MacroStage.SMFIM_ENVRCPT,
    SMFIC_DATA: MacroStage.SMFIM_DATA,
    SMFIC_BODYEOB: MacroStage.SMFIM_EOM,
    SMFIC_EOH: MacroStage.SMFIM_EOH,
}
