"""The MTA side over a real socket, built on the codec: what Postfix does, scripted."""

from __future__ import annotations

import asyncio
import contextlib

from milter_bridge.load.verdicts import FINAL
from milter_bridge.protocol import ReplyDecoder, encode, encode_all
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag


class MtaClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = ReplyDecoder()
        self._backlog: list[r.MilterReply] = []

    @classmethod
    async def connect(cls, port: int) -> MtaClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, *commands: MtaCommand) -> None:
        """Send without waiting for anything (NR events, ABORT, QUIT, macros)."""
        self.writer.write(encode_all(list(commands)))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> list[r.MilterReply]:
        """Everything up to and including the next final reply."""
        out: list[r.MilterReply] = []
        while True:
            while self._backlog:
                item = self._backlog.pop(0)
                out.append(item)
                if isinstance(item, FINAL):
                    return out
            data = await self.reader.read(1 << 16)
            if not data:
                msg = f"the bridge closed the connection (got {out})"
                raise ConnectionError(msg)
            self._backlog += self._decoder.feed(data)

    async def command(self, *commands: MtaCommand) -> list[r.MilterReply]:
        """Send, then wait for the answer to the last command."""
        await self.send(*commands)
        return await self.reply()

    async def negotiate(
        self, version: int = 6, actions: int = 0x1FF, protocol: int = 0x1FFFFF
    ) -> r.OptionNegotiationReply:
        (reply,) = await self.command(
            cmd.OptionNegotiation(version, ActionFlag(actions), ProtocolFlag(protocol))
        )
        assert isinstance(reply, r.OptionNegotiationReply)
        return reply

    async def closed_by_peer(self) -> bool:
        """True when the bridge closed the connection (EOF) without sending anything more."""
        return await self.reader.read(1 << 16) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def quit_packet() -> bytes:
    return encode(cmd.Quit())
