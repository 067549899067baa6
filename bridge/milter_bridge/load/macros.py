"""The macros (``D`` packets) the load tool sends before each event, as Postfix 3.7 does.

Postfix's defaults per stage (``postconf -d milter_*_macros``) apply unless the
milter sent its own list for that stage in the OPTNEG reply (SETSYMLIST), which
then replaces the default for that stage only. Only macros that have a value
are sent. Headers use the end-of-header list and body chunks the end-of-message
list (Postfix's milter8_header and milter8_body). The queue id ``i`` exists
only after the first accepted recipient.
"""

from __future__ import annotations

from dataclasses import dataclass

from milter_bridge.load.shape import DOMAIN, SENDER
from milter_bridge.protocol.constants import SMFIC_MACRO, MacroStage
from milter_bridge.protocol.wire import cstr, u32

# postconf -d of Postfix 3.7.11.
POSTFIX_DEFAULTS: dict[MacroStage, tuple[bytes, ...]] = {
    MacroStage.SMFIM_CONNECT: (b"j", b"{daemon_name}", b"{daemon_addr}", b"v", b"_"),
    MacroStage.SMFIM_HELO: (
        b"{tls_version}",
        b"{cipher}",
        b"{cipher_bits}",
        b"{cert_subject}",
        b"{cert_issuer}",
    ),
    MacroStage.SMFIM_ENVFROM: (
        b"i",
        b"{auth_type}",
        b"{auth_authen}",
        b"{auth_author}",
        b"{mail_addr}",
        b"{mail_host}",
        b"{mail_mailer}",
    ),
    MacroStage.SMFIM_ENVRCPT: (b"i", b"{rcpt_addr}", b"{rcpt_host}", b"{rcpt_mailer}"),
    MacroStage.SMFIM_DATA: (b"i",),
    MacroStage.SMFIM_EOH: (b"i",),
    MacroStage.SMFIM_EOM: (b"i",),
}

# The macro list each command's D packet carries.
STAGE_OF: dict[bytes, MacroStage] = {
    b"C": MacroStage.SMFIM_CONNECT,
    b"H": MacroStage.SMFIM_HELO,
    b"M": MacroStage.SMFIM_ENVFROM,
    b"R": MacroStage.SMFIM_ENVRCPT,
    b"T": MacroStage.SMFIM_DATA,
    b"L": MacroStage.SMFIM_EOH,
    b"N": MacroStage.SMFIM_EOH,
    b"B": MacroStage.SMFIM_EOM,
    b"E": MacroStage.SMFIM_EOM,
}

CLIENT_ADDR = b"192.0.2.1"
CLIENT_NAME = b"client.example.test"
MTA_NAME = b"mta.example.test"

# Values by name without braces; client_port and rcpt_addr are added per connection
# and per recipient.
SESSION_VALUES: dict[bytes, bytes] = {
    b"j": MTA_NAME,
    b"daemon_name": MTA_NAME,
    b"daemon_addr": b"192.0.2.25",
    b"daemon_port": b"25",
    b"v": b"Postfix 3.7.11",
    b"_": CLIENT_NAME + b" [" + CLIENT_ADDR + b"]",
    b"client_addr": CLIENT_ADDR,
    b"client_name": CLIENT_NAME,
    b"client_ptr": CLIENT_NAME,
    b"client_resolve": b"OK",
    b"mail_addr": SENDER,
    b"mail_host": DOMAIN,
    b"mail_mailer": b"smtp",
    b"rcpt_host": DOMAIN,
    b"rcpt_mailer": b"smtp",
}
QUEUE_ID = b"i"


def bare(name: bytes) -> bytes:
    """Milters ask for ``daemon_name`` or ``{daemon_name}``; both mean the same macro."""
    return name[1:-1] if name.startswith(b"{") and name.endswith(b"}") else name


@dataclass(frozen=True, slots=True)
class MacroPacket:
    """One ``D`` packet, ready except for the queue id; ``packet(b"")`` leaves ``i`` out."""

    stage: bytes
    head: bytes  # encoded name/value pairs before ``i``
    tail: bytes  # and after it
    wants_queue_id: bool

    def packet(self, queue_id: bytes) -> bytes:
        middle = QUEUE_ID + b"\0" + queue_id + b"\0" if queue_id and self.wants_queue_id else b""
        payload = self.stage + self.head + middle + self.tail
        return u32(len(payload) + 1) + SMFIC_MACRO + payload


class MacroLists:
    """The macro names per stage for one negotiation: Postfix's defaults or the milter's lists."""

    def __init__(self, requested: tuple[tuple[MacroStage, bytes], ...] = ()) -> None:
        names = dict(POSTFIX_DEFAULTS)
        for stage, listed in requested:
            names[stage] = tuple(listed.split())
        self.names = {stage: tuple((n, bare(n)) for n in listed) for stage, listed in names.items()}

    def uses(self, command: bytes, name: bytes) -> bool:
        """Whether the D packet of ``command`` carries macro ``name`` (without braces)."""
        return any(b == name for _, b in self.names[STAGE_OF[command]])

    def packet(self, command: bytes, values: dict[bytes, bytes]) -> MacroPacket:
        """The D packet for ``command`` (its byte) with the values known at that point."""
        head: list[bytes] = []
        tail: list[bytes] = []
        wants_queue_id = False
        for name, key in self.names[STAGE_OF[command]]:
            if key == QUEUE_ID:
                wants_queue_id = True
                continue
            value = values.get(key)
            if value is not None:
                (tail if wants_queue_id else head).append(cstr(name) + cstr(value))
        return MacroPacket(command, b"".join(head), b"".join(tail), wants_queue_id)
