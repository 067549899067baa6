"""The exception tree of the milter codec and session.

MilterError
├── ProtocolError            the MTA broke the protocol: close that connection
│   ├── FrameTooLarge        a length prefix above the packet cap
│   ├── MalformedPacket      a packet whose payload cannot be parsed
│   └── UnknownCommand       a command or reply byte that does not exist
└── InvalidAnswer            a policy answer that is not valid at this point
    │                        (the failure action applies; the MTA sees nothing of it)
    └── InvalidModification  a modification not negotiated or not valid
"""

from __future__ import annotations


class MilterError(Exception):
    """Base of every error raised by the codec and the session."""


class ProtocolError(MilterError):
    """The peer sent bytes that break the milter protocol."""


class FrameTooLarge(ProtocolError):
    """A packet's length prefix exceeds the configured maximum."""


class MalformedPacket(ProtocolError):
    """A packet's payload does not have the layout its command requires."""


class UnknownCommand(ProtocolError):
    """A packet's command byte is not one the protocol defines."""


class InvalidAnswer(MilterError):
    """A policy answer that the MTA must not see (wrong stage, bad syntax, not negotiated)."""


class InvalidModification(InvalidAnswer):
    """A modification that was not negotiated or is not valid (e.g. CR/LF in a header)."""


QUOTE_LIMIT = 80


def quoted(value: str | bytes, limit: int = QUOTE_LIMIT) -> str:
    """``value`` for an error message: its repr, cut at ``limit`` characters or bytes.

    Error messages end up in log lines; what the MTA or a policy sent may be
    megabytes long.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} in all)"
