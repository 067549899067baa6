"""One row per stage: everything the session, the negotiation and the plan look up by
stage, in one table (libmilter's names on the flags and states).

The dictionaries the other modules use (``NO_FLAG``, ``NR_FLAG``, ``FIRST_VERSION``,
``MACRO_STAGES``, the state a stage's command enters, the stages of a message, the
envelope's macro stages) are derived from ``ROWS`` here, so that a stage is described
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from milter_bridge.protocol import constants as c
from milter_bridge.protocol.constants import MacroStage
from milter_bridge.protocol.constants import ProtocolFlag as P
from milter_bridge.session.states import State
from milter_bridge.v1 import policy_pb2 as pb


class Stage(Enum):
    """The events of an SMTP session, as the policy sees them (EventModes' fields)."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail_from"
    RCPT = "rcpt_to"
    DATA = "data"
    HEADER = "header"
    EOH = "end_of_headers"
    BODY = "body"
    EOM = "end_of_message"
    UNKNOWN = "unknown"
    ABORT = "abort"


class Mode(Enum):
    """How the policy takes part in an event (EventMode without UNSPECIFIED)."""

    SKIP = pb.EVENT_MODE_SKIP
    OBSERVE = pb.EVENT_MODE_OBSERVE
    DECIDE = pb.EVENT_MODE_DECIDE


@dataclass(frozen=True, slots=True)
class StageRow:
    stage: Stage
    command: bytes  # the SMFIC_* command that carries it
    state: State  # the libmilter state that command enters
    macros: MacroStage | None  # the SMFIM_* stage of its macros (the D packet before it)
    in_message: bool  # part of a message (MAIL FROM to end of message)
    no_flag: P | None  # SMFIP_NO*: the MTA does not send it
    nr_flag: P | None  # SMFIP_NR_*: the MTA does not wait for an answer
    first_version: int = 2  # the first protocol version that has it
    envelope: bool = False  # its macros go into EndOfMessage.envelope.macros
    discard: bool = True  # ACTION_DISCARD is a valid verdict (there is a message to drop)


ROWS: tuple[StageRow, ...] = (
    StageRow(Stage.CONNECT, c.SMFIC_CONNECT, State.CONN, MacroStage.SMFIM_CONNECT, False,
             P.SMFIP_NOCONNECT, P.SMFIP_NR_CONN, envelope=True, discard=False),
    StageRow(Stage.HELO, c.SMFIC_HELO, State.HELO, MacroStage.SMFIM_HELO, False,
             P.SMFIP_NOHELO, P.SMFIP_NR_HELO, envelope=True, discard=False),
    StageRow(Stage.MAIL, c.SMFIC_MAIL, State.MAIL, MacroStage.SMFIM_ENVFROM, True,
             P.SMFIP_NOMAIL, P.SMFIP_NR_MAIL, envelope=True),
    StageRow(Stage.RCPT, c.SMFIC_RCPT, State.RCPT, MacroStage.SMFIM_ENVRCPT, True,
             P.SMFIP_NORCPT, P.SMFIP_NR_RCPT, envelope=True),
    StageRow(Stage.DATA, c.SMFIC_DATA, State.DATA, MacroStage.SMFIM_DATA, True,
             P.SMFIP_NODATA, P.SMFIP_NR_DATA, first_version=4, envelope=True),
    StageRow(Stage.HEADER, c.SMFIC_HEADER, State.HDRS, None, True,
             P.SMFIP_NOHDRS, P.SMFIP_NR_HDR),
    StageRow(Stage.EOH, c.SMFIC_EOH, State.EOHS, MacroStage.SMFIM_EOH, True,
             P.SMFIP_NOEOH, P.SMFIP_NR_EOH, envelope=True),
    StageRow(Stage.BODY, c.SMFIC_BODY, State.BODY, None, True,
             P.SMFIP_NOBODY, P.SMFIP_NR_BODY),
    # End of message is always sent and always answered: no flag turns it off.
    StageRow(Stage.EOM, c.SMFIC_BODYEOB, State.ENDM, MacroStage.SMFIM_EOM, True, None, None),
    StageRow(Stage.UNKNOWN, c.SMFIC_UNKNOWN, State.UNKN, None, False,
             P.SMFIP_NOUNKNOWN, P.SMFIP_NR_UNKN, first_version=3, discard=False),
    # ABORT is only ever observed, and belongs to the message it ends.
    StageRow(Stage.ABORT, c.SMFIC_ABORT, State.ABRT, None, True, None, None),
)  # fmt: skip
ROW = {row.stage: row for row in ROWS}

# What the other modules look up, derived from the rows.
NO_FLAG: dict[Stage, P] = {r.stage: r.no_flag for r in ROWS if r.no_flag is not None}
NR_FLAG: dict[Stage, P] = {r.stage: r.nr_flag for r in ROWS if r.nr_flag is not None}
FIRST_VERSION: dict[Stage, int] = {r.stage: r.first_version for r in ROWS if r.first_version > 2}
# The events the MTA may skip map to these states (end of message and ABORT never are).
STATE_OF_STAGE: dict[Stage, State] = {r.stage: r.state for r in ROWS if r.no_flag is not None}
MESSAGE_STAGES = frozenset(r.stage for r in ROWS if r.in_message and r.stage is not Stage.ABORT)
ENVELOPE_MACROS: dict[str, MacroStage] = {
    r.stage.value: r.macros for r in ROWS if r.envelope and r.macros is not None
}
NO_DISCARD = frozenset(r.stage for r in ROWS if not r.discard)
# MacroRequest fields -> the OPTNEG macro list stage.
MACRO_STAGES: dict[str, MacroStage] = {
    r.stage.value: r.macros for r in ROWS if r.macros is not None
}
