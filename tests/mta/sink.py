"""An SMTP server in the test's event loop that records what an MTA relays to it.

Each message keeps its envelope with the ESMTP parameters (DSN is advertised,
so NOTIFY and ORCPT are relayed) and the raw message. Tests await the next
message instead of polling a directory.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str] = field(default_factory=list)
    data: bytes = b""

    @property
    def sender(self) -> str:
        """The MAIL FROM address, without ESMTP parameters."""
        return self.mail_from.split(" ", 1)[0]

    @property
    def recipients(self) -> list[str]:
        """The RCPT TO addresses, without ESMTP parameters."""
        return [r.split(" ", 1)[0] for r in self.rcpt_to]

    @property
    def headers(self) -> list[tuple[str, str]]:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        out: list[tuple[str, str]] = []
        for line in head.split("\r\n"):
            if line[:1] in (" ", "\t") and out:
                out[-1] = (out[-1][0], out[-1][1] + "\r\n" + line)
            elif ":" in line:
                name, value = line.split(":", 1)
                out.append((name, value.strip()))
        return out

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


class SmtpSink:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[Received] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def next(self, timeout: float = 30.0) -> Received:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        current: Received | None = None
        say("220 sink.example.test ESMTP test sink")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    say("250-sink.example.test\r\n250-8BITMIME\r\n250-DSN\r\n250 SIZE 104857600")
                elif verb == b"MAIL":
                    current = Received(line[10:].strip().decode())
                    say("250 2.1.0 Ok")
                elif verb == b"RCPT" and current is not None:
                    current.rcpt_to.append(line[8:].strip().decode())
                    say("250 2.1.5 Ok")
                elif verb == b"DATA" and current is not None:
                    say("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    lines = []
                    while (row := await reader.readline()) not in (b".\r\n", b""):
                        lines.append(row[1:] if row.startswith(b".") else row)  # dot-unstuffing
                    current.data = b"".join(lines)
                    self.messages.put_nowait(current)
                    current = None
                    say("250 2.0.0 Ok: queued")
                elif verb == b"QUIT":
                    say("221 2.0.0 Bye")
                    break
                elif verb in (b"RSET", b"NOOP"):
                    current = None if verb == b"RSET" else current
                    say("250 2.0.0 Ok")
                else:
                    say("502 5.5.2 Error: command not recognized")
                await writer.drain()
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
