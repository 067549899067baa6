"""Milter commands -> the policy API's event messages, with the text rules of the proto.

Strings are decoded as UTF-8 with invalid sequences replaced; where the
proto has a ``_raw`` twin it carries the exact bytes when decoding was lossy.
"""

from __future__ import annotations

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import constants as c
from milter_bridge.v1 import policy_pb2 as pb

_FAMILY = {
    c.SMFIA_UNKNOWN: pb.ADDRESS_FAMILY_UNKNOWN,
    c.SMFIA_UNIX: pb.ADDRESS_FAMILY_UNIX,
    c.SMFIA_INET: pb.ADDRESS_FAMILY_INET,
    c.SMFIA_INET6: pb.ADDRESS_FAMILY_INET6,
}


def text(raw: bytes) -> tuple[str, bytes]:
    """(decoded text, raw bytes if the decoding was lossy else b"")."""
    try:
        return raw.decode("utf-8"), b""
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), raw


def _texts(raws: tuple[bytes, ...]) -> list[str]:
    return [text(a)[0] for a in raws]


def connect(command: cmd.Connect) -> pb.Connect:
    hostname, hostname_raw = text(command.hostname)
    address = text(command.address)[0]
    # Sendmail writes IPv6 client addresses as "IPv6:::1".
    if command.family == c.SMFIA_INET6 and address[:5].lower() == "ipv6:":
        address = address[5:]
    return pb.Connect(
        hostname=hostname,
        hostname_raw=hostname_raw,
        family=_FAMILY[command.family],
        address=address,
        port=command.port,
    )


def helo(command: cmd.Helo) -> pb.Helo:
    name, raw = text(command.name)
    return pb.Helo(name=name, name_raw=raw)


def mail_from(command: cmd.Mail) -> pb.MailFrom:
    address, raw = text(command.address)
    return pb.MailFrom(address=address, address_raw=raw, esmtp_args=_texts(command.esmtp_args))


def rcpt_to(command: cmd.Rcpt, *, rejected: bool) -> pb.RcptTo:
    address, raw = text(command.address)
    return pb.RcptTo(
        address=address,
        address_raw=raw,
        esmtp_args=_texts(command.esmtp_args),
        rejected=rejected,
    )


def header(command: cmd.Header) -> pb.Header:
    return pb.Header(name=text(command.name)[0], value=command.value)


def unknown(command: cmd.Unknown) -> pb.Unknown:
    line, raw = text(command.line)
    return pb.Unknown(command=line, command_raw=raw)
