"""libmilter's command state table (engine.c), so that out-of-order commands fare as there.

A command whose state cannot follow the current one is not an error: if the
connection is inside a message the message is aborted, then the command is
tried as if the state were HELO, and if it cannot follow HELO either it is
ignored without any reply. Only QUIT always ends the session (it carries
CT_END). States a milter opted out of (NO* flags) may be passed over.

Three deliberate differences:

- libmilter lets QUIT_NC follow only end of message or UNKNOWN and would
  ignore it, and then the next CONNECT, anywhere else. No MTA sends QUIT_NC
  today; the bridge accepts it in every state so that a new session can
  always start.
- UNKNOWN is checked against the table but does not change the state. In
  libmilter it moves to UNKN, from which headers, end of headers and end of
  message cannot follow: an unknown SMTP command inside a transaction (Postfix
  sends those) would make libmilter drop the rest of the message and leave
  end of message unanswered until the MTA times out.
- Headers and body chunks may legitimately occur zero times, so their states
  can always be passed over, not only when opted out of. libmilter drops end
  of message after DATA for a milter that wants headers but not end of
  headers when the message has no header at all.
"""

from __future__ import annotations

import functools
from enum import IntEnum

from milter_bridge.protocol import constants as c


class State(IntEnum):
    """ST_* of engine.c; the numbering matters (ST_IN_MAIL, skip chaining)."""

    INIT = 0
    OPTS = 1
    CONN = 2
    HELO = 3
    MAIL = 4
    RCPT = 5
    DATA = 6
    HDRS = 7
    EOHS = 8
    BODY = 9
    ENDM = 10
    QUIT = 11
    ABRT = 12
    UNKN = 13
    Q_NC = 14


S = State


def _mask(*states: State) -> int:
    bits = 0
    for st in states:
        bits |= 1 << st
    return bits


# NX_* of engine.c: the states that may follow each state.
NEXT: dict[State, int] = {
    S.INIT: _mask(S.OPTS),
    S.OPTS: _mask(S.CONN, S.UNKN),
    S.CONN: _mask(S.HELO, S.MAIL, S.UNKN),
    S.HELO: _mask(S.HELO, S.MAIL, S.UNKN),
    S.MAIL: _mask(S.RCPT, S.ABRT, S.UNKN),
    S.RCPT: _mask(S.HDRS, S.EOHS, S.DATA, S.BODY, S.ENDM, S.RCPT, S.ABRT, S.UNKN),
    S.DATA: _mask(S.EOHS, S.HDRS, S.ABRT),
    S.HDRS: _mask(S.EOHS, S.HDRS, S.ABRT),
    S.EOHS: _mask(S.BODY, S.ENDM, S.ABRT),
    S.BODY: _mask(S.ENDM, S.BODY, S.ABRT),
    S.ENDM: _mask(S.QUIT, S.MAIL, S.UNKN, S.Q_NC),
    S.QUIT: 0,
    S.ABRT: 0,
    S.UNKN: _mask(S.HELO, S.MAIL, S.RCPT, S.ABRT, S.DATA, S.BODY, S.UNKN, S.QUIT, S.Q_NC),
    S.Q_NC: _mask(S.CONN, S.UNKN),
}

# The state each command moves to; MACRO has none.
STATE_OF: dict[bytes, State] = {
    c.SMFIC_OPTNEG: S.OPTS,
    c.SMFIC_CONNECT: S.CONN,
    c.SMFIC_HELO: S.HELO,
    c.SMFIC_MAIL: S.MAIL,
    c.SMFIC_RCPT: S.RCPT,
    c.SMFIC_DATA: S.DATA,
    c.SMFIC_HEADER: S.HDRS,
    c.SMFIC_EOH: S.EOHS,
    c.SMFIC_BODY: S.BODY,
    c.SMFIC_BODYEOB: S.ENDM,
    c.SMFIC_QUIT: S.QUIT,
    c.SMFIC_ABORT: S.ABRT,
    c.SMFIC_UNKNOWN: S.UNKN,
    c.SMFIC_QUIT_NC: S.Q_NC,
}

# Commands after whose REJECT/TEMPFAIL/DISCARD the state stays (CT_IGNO): a
# rejected recipient or unknown command does not end the message.
KEEPS_STATE_ON_REJECT = frozenset({c.SMFIC_RCPT, c.SMFIC_UNKNOWN})


def in_mail(state: State) -> bool:
    """ST_IN_MAIL: inside a message transaction, where an abort must be reported."""
    return S.MAIL <= state < S.ENDM


# States that may occur zero times in a message.
OPTIONAL = frozenset({S.HDRS, S.BODY})


@functools.lru_cache(maxsize=4096)  # a few plans x 19 x 19 states: computed once each
def transition_ok(current: State, new: State, skippable: frozenset[State]) -> bool:
    """trans_ok(): ``new`` may follow ``current``, passing over opted-out and optional states."""
    skippable = skippable | OPTIONAL
    st = current
    while True:
        if NEXT[st] & (1 << new):
            return True
        following = State(st + 1) if st + 1 <= S.Q_NC else None
        if following is None or following not in skippable:
            return False
        st = following
