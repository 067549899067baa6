"""One black-box connection: send one input, half-close, read the bridge's replies until it
closes, and say how it ended.

The bridge reads nothing while the policy decides (as libmilter), and closes a
connection once it has answered what it read before the MTA's EOF, or at the
first protocol error. So after the fuzzer's EOF every connection must be closed
by the bridge within one stage deadline (the one event that may be awaiting the
policy) plus a margin: a connection still open after ``hang_after`` seconds is a
hang. Every byte the bridge sends must decode, with the project's ReplyDecoder,
into whole replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from enum import StrEnum

from fuzz.inputs import FuzzInput
from milter_bridge.config import ConfigError, ListenKind, parse_listen
from milter_bridge.protocol import ProtocolError, ReplyDecoder, decode_reply
from milter_bridge.protocol import constants as c
from milter_bridge.protocol.constants import ProtocolFlag
from milter_bridge.protocol.replies import OptionNegotiationReply

READ_SIZE = 1 << 16
# In lockstep, how long to wait for the reply to a command before sending the next: the
# bridge answers an out-of-order command with nothing (as libmilter), so none may come.
# The waits that end without a reply stop at LOCKSTEP_BUDGET per connection (a repeated
# ignored command would otherwise take minutes); the rest is written without waiting.
REPLY_WAIT = 0.05
LOCKSTEP_BUDGET = 0.2
P = ProtocolFlag
# Commands an MTA waits on, with the flag that tells it not to (None: it always waits).
# Macros, ABORT and QUIT are never answered.
AWAITED: dict[bytes, ProtocolFlag | None] = {
    c.SMFIC_OPTNEG: None,
    c.SMFIC_CONNECT: P.SMFIP_NR_CONN,
    c.SMFIC_HELO: P.SMFIP_NR_HELO,
    c.SMFIC_MAIL: P.SMFIP_NR_MAIL,
    c.SMFIC_RCPT: P.SMFIP_NR_RCPT,
    c.SMFIC_DATA: P.SMFIP_NR_DATA,
    c.SMFIC_HEADER: P.SMFIP_NR_HDR,
    c.SMFIC_EOH: P.SMFIP_NR_EOH,
    c.SMFIC_BODY: P.SMFIP_NR_BODY,
    c.SMFIC_UNKNOWN: P.SMFIP_NR_UNKN,
    c.SMFIC_BODYEOB: None,
}


class Ending(StrEnum):
    REPLIED = "closed by the bridge after replies"
    SILENT = "closed by the bridge without a reply"
    RESET = "reset"
    HANG = "hang"
    CONNECT_FAILED = "connect failed"


@dataclass(frozen=True, slots=True)
class Target:
    family: socket.AddressFamily
    address: str | tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Target:
        """``unix:/PATH`` or ``inet:HOST:PORT`` with a loopback HOST: a fuzzer is
        never pointed at anything off this machine."""
        listen = parse_listen(text)
        if listen.kind is ListenKind.UNIX:
            return cls(socket.AF_UNIX, listen.path)
        if not ipaddress.ip_address(listen.host).is_loopback:
            msg = f"{text}: only loopback addresses"
            raise ConfigError(msg)
        family = socket.AF_INET6 if listen.kind is ListenKind.INET6 else socket.AF_INET
        return cls(family, (listen.host, listen.port))


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    sent: int  # bytes written before the EOF (all of the input, unless the bridge closed first)
    received: int
    replies: int  # whole replies decoded
    cut_short: bool  # the bridge closed before it had taken the whole input
    bad_reply: str | None  # why what the bridge sent did not decode
    after_eof: float  # seconds from the EOF to the bridge's close (to giving up, for a hang)


@dataclass(slots=True)
class _Replies:
    decoder: ReplyDecoder
    received: int = 0
    count: int = 0
    bad: str | None = None
    closed: bool = False  # the bridge closed the connection (EOF read)
    reset: bool = False
    protocol: ProtocolFlag | None = None  # as the bridge's OPTNEG reply negotiated it
    news: asyncio.Event = field(default_factory=asyncio.Event)  # a reply, or the end

    def take(self, data: bytes) -> None:
        self.received += len(data)
        if self.bad is not None:
            return
        # ReplyDecoder.feed, one reply at a time: those before a bad one are counted.
        try:
            for frame in self.decoder.frames.feed(data):
                reply = decode_reply(frame)
                self.count += 1
                self.news.set()
                if isinstance(reply, OptionNegotiationReply) and self.protocol is None:
                    self.protocol = reply.protocol
        except ProtocolError as exc:
            self.bad = str(exc)

    def awaited(self, packet: bytes) -> bool:
        """Whether an MTA would wait for the bridge's reply to this packet."""
        code = packet[4:5]
        if len(packet) < 5 or code not in AWAITED:
            return False
        no_reply = AWAITED[code]
        return no_reply is None or self.protocol is None or not no_reply & self.protocol

    async def reply_after(self, count: int) -> None:
        """Until a reply beyond the first ``count`` arrives or the connection ends."""
        while self.count <= count and not (self.closed or self.reset):
            self.news.clear()
            await self.news.wait()


async def _read_until_closed(sock: socket.socket, replies: _Replies) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(sock, READ_SIZE):
            replies.take(data)
    except ConnectionResetError:
        # What was in flight may be lost with a reset: a cut reply is no finding then.
        replies.reset = True
        replies.news.set()
        return
    replies.closed = True
    replies.news.set()
    left = replies.decoder.frames.buffered
    if left and replies.bad is None:
        replies.bad = f"closed inside a reply ({left} bytes of it sent)"


@dataclass(frozen=True, slots=True)
class Patience:
    """In lockstep: how long to wait for each reply, and for all that do not come."""

    reply: float = REPLY_WAIT
    budget: float = LOCKSTEP_BUDGET


async def _write(
    sock: socket.socket, item: FuzzInput, replies: _Replies, stall: float, patience: Patience
) -> tuple[int, bool, bool]:
    """(bytes sent, whether the bridge closed first, whether a write stalled past ``stall``)."""
    loop = asyncio.get_running_loop()
    sent = 0
    budget = patience.budget if item.lockstep else 0.0
    for chunk, pause in item.writes():
        before = replies.count
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), stall)
        except TimeoutError:
            return sent, False, True
        except (BrokenPipeError, ConnectionResetError):
            return sent, True, False
        sent += len(chunk)
        if budget > 0 and replies.awaited(chunk):
            try:
                await asyncio.wait_for(replies.reply_after(before), patience.reply)
            except TimeoutError:
                budget -= patience.reply
        await asyncio.sleep(pause)  # 0: still lets the other connections run
    return sent, False, False


async def exchange(
    target: Target, item: FuzzInput, hang_after: float, patience: Patience = Patience()
) -> Outcome:
    loop = asyncio.get_running_loop()
    replies = _Replies(ReplyDecoder())
    with socket.socket(target.family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, target.address), hang_after)
        except (OSError, TimeoutError):
            return Outcome(Ending.CONNECT_FAILED, 0, 0, 0, False, None, 0.0)
        reading = asyncio.create_task(_read_until_closed(sock, replies))
        try:
            sent, cut_short, stalled = await _write(sock, item, replies, hang_after, patience)
            eof_at = loop.time()
            if not stalled:
                with contextlib.suppress(OSError):  # already reset: nothing to half-close
                    sock.shutdown(socket.SHUT_WR)  # the MTA's EOF
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reading), hang_after)
            after_eof = loop.time() - eof_at
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    if replies.closed:
        ending = Ending.REPLIED if replies.received else Ending.SILENT
    else:
        ending = Ending.RESET if replies.reset else Ending.HANG
    return Outcome(ending, sent, replies.received, replies.count, cut_short, replies.bad, after_eof)
