"""Commands the MTA sends to a milter, one frozen dataclass each.

Every class has its command byte in ``code``, ``payload()`` giving the bytes
after the command byte and ``parse(payload)`` doing the reverse. Fields hold
the exact wire bytes: decoding text is the session's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Self

from milter_bridge.protocol import constants as c
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.protocol.errors import quoted
from milter_bridge.protocol.wire import Reader, cstr, u16, u32


@dataclass(frozen=True, slots=True)
class OptionNegotiation:
    """SMFIC_OPTNEG: what the MTA offers."""

    code: ClassVar[bytes] = c.SMFIC_OPTNEG
    version: int
    actions: ActionFlag
    protocol: ProtocolFlag

    def payload(self) -> bytes:
        return u32(self.version) + u32(self.actions) + u32(self.protocol)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "OPTNEG")
        version, actions, protocol = r.u32(), r.u32(), r.u32()
        r.end()
        return cls(version, ActionFlag(actions), ProtocolFlag(protocol))


@dataclass(frozen=True, slots=True)
class DefineMacro:
    """SMFIC_MACRO: macros for the command ``stage`` that follows.

    ``stage`` is that command's byte (C, H, M, R, T, N, E; Postfix also sends
    L and B); ``macros`` are (name, value) pairs in wire order, names as sent
    (``j`` or ``{daemon_name}``).
    """

    code: ClassVar[bytes] = c.SMFIC_MACRO
    stage: bytes
    macros: tuple[tuple[bytes, bytes], ...] = ()

    def payload(self) -> bytes:
        return self.stage + b"".join(cstr(n) + cstr(v) for n, v in self.macros)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "MACRO")
        stage = r.byte()
        items = r.cstrs()
        if len(items) % 2:
            raise r.error(f"name {quoted(items[-1])} without a value")
        return cls(stage, tuple(zip(items[::2], items[1::2], strict=True)))


@dataclass(frozen=True, slots=True)
class Connect:
    """SMFIC_CONNECT: host name, family and (unless family U) port and address."""

    code: ClassVar[bytes] = c.SMFIC_CONNECT
    hostname: bytes
    family: bytes
    port: int = 0
    address: bytes = b""

    def payload(self) -> bytes:
        head = cstr(self.hostname) + self.family
        if self.family == c.SMFIA_UNKNOWN:
            return head
        return head + u16(self.port) + cstr(self.address)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "CONNECT")
        hostname = r.cstr()
        family = r.byte()
        if family == c.SMFIA_UNKNOWN:
            r.end()
            return cls(hostname, family)
        if family not in (c.SMFIA_UNIX, c.SMFIA_INET, c.SMFIA_INET6):
            raise r.error(f"unknown address family {family!r}")
        port = r.u16()
        address = r.cstr()
        r.end()
        return cls(hostname, family, port, address)


@dataclass(frozen=True, slots=True)
class Helo:
    """SMFIC_HELO: the HELO/EHLO argument."""

    code: ClassVar[bytes] = c.SMFIC_HELO
    name: bytes

    def payload(self) -> bytes:
        return cstr(self.name)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "HELO")
        name = r.cstr()
        r.end()
        return cls(name)


def _parse_argv(payload: bytes, what: str) -> tuple[bytes, tuple[bytes, ...]]:
    r = Reader(payload, what)
    argv = r.cstrs()
    if not argv:
        raise r.error("no address")
    return argv[0], argv[1:]


@dataclass(frozen=True, slots=True)
class Mail:
    """SMFIC_MAIL: the sender and its ESMTP arguments."""

    code: ClassVar[bytes] = c.SMFIC_MAIL
    address: bytes
    esmtp_args: tuple[bytes, ...] = ()

    def payload(self) -> bytes:
        return b"".join(cstr(a) for a in (self.address, *self.esmtp_args))

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(*_parse_argv(payload, "MAIL"))


@dataclass(frozen=True, slots=True)
class Rcpt:
    """SMFIC_RCPT: one recipient and its ESMTP arguments."""

    code: ClassVar[bytes] = c.SMFIC_RCPT
    address: bytes
    esmtp_args: tuple[bytes, ...] = ()

    def payload(self) -> bytes:
        return b"".join(cstr(a) for a in (self.address, *self.esmtp_args))

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(*_parse_argv(payload, "RCPT"))


@dataclass(frozen=True, slots=True)
class Header:
    """SMFIC_HEADER: one header; folded lines are separated by a bare LF."""

    code: ClassVar[bytes] = c.SMFIC_HEADER
    name: bytes
    value: bytes

    def payload(self) -> bytes:
        return cstr(self.name) + cstr(self.value)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        # The hot path (every header of every message): one split when well formed.
        fields = payload.split(b"\0")
        if len(fields) == 3 and not fields[2]:
            return cls(fields[0], fields[1])
        r = Reader(payload, "HEADER")
        name, value = r.cstr(), r.cstr()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class Body:
    """SMFIC_BODY: a body chunk, CRLF line endings, normally at most 65535 bytes."""

    code: ClassVar[bytes] = c.SMFIC_BODY
    chunk: bytes

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """SMFIC_BODYEOB: end of message. libmilter treats data here as a last body chunk."""

    code: ClassVar[bytes] = c.SMFIC_BODYEOB
    chunk: bytes = b""

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command line the MTA did not recognise (v3+)."""

    code: ClassVar[bytes] = c.SMFIC_UNKNOWN
    line: bytes

    def payload(self) -> bytes:
        return cstr(self.line)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = Reader(payload, "UNKNOWN")
        line = r.cstr()
        r.end()
        return cls(line)


@dataclass(frozen=True, slots=True)
class _NoPayload:
    """A command that carries nothing; libmilter ignores any bytes sent with it."""

    code: ClassVar[bytes]
    ignored: bytes = field(default=b"", compare=True)

    def payload(self) -> bytes:
        return self.ignored

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class Data(_NoPayload):
    """SMFIC_DATA: the DATA command (v4+)."""

    code: ClassVar[bytes] = c.SMFIC_DATA


@dataclass(frozen=True, slots=True)
class EndOfHeaders(_NoPayload):
    """SMFIC_EOH: end of headers."""

    code: ClassVar[bytes] = c.SMFIC_EOH


@dataclass(frozen=True, slots=True)
class Abort(_NoPayload):
    """SMFIC_ABORT: the current message is over without EOM; never answered."""

    code: ClassVar[bytes] = c.SMFIC_ABORT


@dataclass(frozen=True, slots=True)
class Quit(_NoPayload):
    """SMFIC_QUIT: the MTA closes the milter connection; never answered."""

    code: ClassVar[bytes] = c.SMFIC_QUIT


@dataclass(frozen=True, slots=True)
class QuitNewConnection(_NoPayload):
    """SMFIC_QUIT_NC: this SMTP session is over, a new CONNECT follows on this socket (v6)."""

    code: ClassVar[bytes] = c.SMFIC_QUIT_NC


MtaCommand = (
    OptionNegotiation
    | DefineMacro
    | Connect
    | Helo
    | Mail
    | Rcpt
    | Data
    | Header
    | EndOfHeaders
    | Body
    | EndOfMessage
    | Unknown
    | Abort
    | Quit
    | QuitNewConnection
)

COMMAND_PARSERS: dict[bytes, Callable[[bytes], MtaCommand]] = {
    cls.code: cls.parse
    for cls in (
        OptionNegotiation,
        DefineMacro,
        Connect,
        Helo,
        Mail,
        Rcpt,
        Data,
        Header,
        EndOfHeaders,
        Body,
        EndOfMessage,
        Unknown,
        Abort,
        Quit,
        QuitNewConnection,
    )
}
