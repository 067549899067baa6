"""One milter socket as an asyncio Protocol: write bytes, await the answer to one event.

A Protocol rather than streams: no task, no StreamReader buffer, one future per
awaited answer. Replies are only valid while the MTA waits for one: whatever
arrives while nothing is awaited, or after the final reply of the awaited event
(in the same read or later), answers nothing the MTA asked, e.g. a reply to an
event negotiated without reply (NR), and is reported as unexpected.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import cast

from milter_bridge.config import ListenKind, parse_listen
from milter_bridge.load.stats import ErrorKind
from milter_bridge.load.verdicts import FINAL
from milter_bridge.protocol import FrameDecoder, ProtocolError, decode_reply
from milter_bridge.protocol import replies as r

# Replies without payload, decoded once: most answers are one of these.
_BARE: dict[bytes, r.MilterReply] = {
    cls.code: cls()
    for cls in (r.Continue, r.Accept, r.Reject, r.TempFail, r.Discard, r.Skip, r.Progress)
}
# struct linger {l_onoff, l_linger}: on, 0 s. close() then sends RST, not FIN.
_LINGER_0 = struct.pack("ii", 1, 0)


class Closed(ConnectionError):
    """The milter closed the connection while the MTA waited for an answer."""


class Wire(asyncio.Protocol):
    def __init__(self, report: Callable[[ErrorKind, str], None]) -> None:
        """``report`` gets the protocol errors found while the MTA waited for nothing."""
        self._report = report
        self._decoder = FrameDecoder()
        self._replies: list[r.MilterReply] = []
        self._waiter: asyncio.Future[list[r.MilterReply]] | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        # One timer per connection, moved on lazily: an answer that arrives in time
        # costs no timer of its own.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not derive from asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._break(exc)
            return
        for frame in frames:
            reply = None if frame.payload else _BARE.get(frame.code)
            if reply is None:
                try:
                    reply = decode_reply(frame)
                except ProtocolError as exc:
                    self._break(exc)
                    return
            waiter = self._waiter
            if waiter is None:
                self._report(ErrorKind.UNEXPECTED, f"reply {reply!r} while the MTA waited for none")
                continue
            self._replies.append(reply)
            if isinstance(reply, FINAL):
                self._waiter = None
                replies, self._replies = self._replies, []
                if not waiter.done():
                    waiter.set_result(replies)

    def _break(self, exc: ProtocolError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None:
            self._report(ErrorKind.MALFORMED, f"while the MTA waited for nothing: {exc}")
        elif not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            got = f" after {self._replies!r}" if self._replies else ""
            waiter.set_exception(Closed(f"the milter closed the connection{got}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> None:
        """Write without waiting for anything (events without reply, ABORT, QUIT)."""
        assert self.transport is not None
        self.transport.write(data)

    async def ask(self, data: bytes, timeout: float) -> list[r.MilterReply]:
        """Write, then the replies up to the final one.

        Raises Closed, TimeoutError or ProtocolError."""
        if self.closed.done():
            msg = "the milter had closed the connection"
            raise Closed(msg)
        assert self.transport is not None
        waiter = self._waiter = self._loop.create_future()
        self.transport.write(data)
        self._deadline = self._loop.time() + timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)
        replies: list[r.MilterReply] = await waiter
        return replies

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # the next ask arms the timer again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)
            return
        self._waiter = None
        got = f" (got {self._replies!r} so far)" if self._replies else ""
        waiter.set_exception(TimeoutError(f"no answer{got}"))

    def finish(self, data: bytes, timeout: float) -> asyncio.Future[None]:
        """Write the last packets and half-close; the future is done when the milter closed.

        Postfix does not wait for that close, nor does the caller have to; but the
        connection stays open until then (at most ``timeout``), so that a late reply
        (e.g. to an event without reply) shows up as unexpected instead of being lost."""
        assert self.transport is not None
        if not self.closed.done():
            self.transport.write(data)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            timer = self._loop.call_later(timeout, self.transport.abort)
            self.closed.add_done_callback(lambda _: timer.cancel())
        self.closed.add_done_callback(lambda _: self._close())
        return self.closed

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abandon(self, data: bytes, *, reset: bool, timeout: float) -> asyncio.Future[None]:
        """Write the last packets and end the connection at once, reading nothing more.

        The MTA went away in the middle of a message; the future is done when the
        socket is closed. ``reset=False`` (fin): the data, then FIN (shut down for
        writing, then closed; should an answer arrive before the close, TCP adds an
        RST after the FIN, as for any close with unread data). ``reset=True`` (rst):
        on TCP SO_LINGER is set to on, 0 s, so that the close sends RST and the kernel
        drops what it has not sent yet. A unix socket has no RST: the transport is
        aborted (what it has not handed to the kernel is dropped) and the milter sees
        the end of the stream (Linux: ECONNRESET when the MTA's side left data unread)."""
        transport = self.transport
        assert transport is not None
        if not self.closed.done():
            transport.write(data)
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
                transport.abort()
            else:
                if transport.can_write_eof():
                    transport.write_eof()
                transport.close()  # after the buffered data, if the kernel did not take all
                timer = self._loop.call_later(timeout, transport.abort)
                self.closed.add_done_callback(lambda _: timer.cancel())
        return self.closed


class Target:
    """Where the milter listens: ``inet:HOST:PORT``, ``inet6:[ADDR]:PORT`` or ``unix:/PATH``."""

    def __init__(self, spec: str) -> None:
        self.listen = parse_listen(spec)  # raises ConfigError

    def __str__(self) -> str:
        return str(self.listen)

    async def open(self, factory: Callable[[], Wire]) -> Wire:
        loop = asyncio.get_running_loop()
        listen = self.listen
        if listen.kind is ListenKind.UNIX:
            _, wire = await loop.create_unix_connection(factory, listen.path)
        else:
            _, wire = await loop.create_connection(factory, listen.host, listen.port)
        return wire
