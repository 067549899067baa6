"""A scripted milter on port 0, written with the project's codec, for the load tool's tests.

It answers as its negotiation says (continue to every event that expects a
reply, accept at end of message) unless a test's ``answer`` says otherwise,
after ``delays`` seconds for the commands of a kind when a test asks for it,
records every command per connection and how the connection ended, and closes
on QUIT as libmilter does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from milter_bridge.protocol import CommandDecoder, encode_all
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.constants import ActionFlag, MacroStage, ProtocolFlag

P = ProtocolFlag
NO_REPLY = {
    cmd.Connect: P.SMFIP_NR_CONN,
    cmd.Helo: P.SMFIP_NR_HELO,
    cmd.Mail: P.SMFIP_NR_MAIL,
    cmd.Rcpt: P.SMFIP_NR_RCPT,
    cmd.Data: P.SMFIP_NR_DATA,
    cmd.Header: P.SMFIP_NR_HDR,
    cmd.EndOfHeaders: P.SMFIP_NR_EOH,
    cmd.Body: P.SMFIP_NR_BODY,
}


class Close:
    """What an answer function returns to close the connection instead of answering."""


CLOSE = Close()


def optneg(
    protocol: int = 0,
    actions: int = 0x1FF,
    version: int = 6,
    macros: tuple[tuple[MacroStage, bytes], ...] = (),
) -> r.OptionNegotiationReply:
    return r.OptionNegotiationReply(version, ActionFlag(actions), ProtocolFlag(protocol), macros)


# An answer function returns the replies, raw bytes, CLOSE, or None for the default.
Answer = Callable[[MtaCommand, "Conversation"], "list[r.MilterReply] | bytes | Close | None"]


@dataclass
class Conversation:
    """One MTA connection as the milter saw it."""

    commands: list[MtaCommand] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: ConnectionError | None = None  # e.g. ConnectionResetError after an RST

    def codes(self) -> list[str]:
        """Command bytes in order, a D packet written as D plus its stage: ["O", "DC", "C", ...]."""
        return [
            "D" + c.stage.decode() if isinstance(c, cmd.DefineMacro) else c.code.decode()
            for c in self.commands
        ]

    def macros(self, stage: bytes) -> list[tuple[tuple[bytes, bytes], ...]]:
        return [
            c.macros for c in self.commands if isinstance(c, cmd.DefineMacro) and c.stage == stage
        ]


class FakeMilter:
    def __init__(
        self,
        negotiation: r.OptionNegotiationReply,
        answer: Answer | None = None,
        delays: Mapping[type, float] | None = None,
    ) -> None:
        self.negotiation = negotiation
        self.answer = answer
        self.delays = dict(delays or {})
        self.conversations: list[Conversation] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def target(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def default(self, command: MtaCommand) -> list[r.MilterReply]:
        if isinstance(command, cmd.OptionNegotiation):
            return [self.negotiation]
        if isinstance(command, cmd.EndOfMessage):
            return [r.Accept()]
        flag = NO_REPLY.get(type(command))
        if flag is None or self.negotiation.protocol & flag:
            return []
        return [r.Continue()]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conversation = Conversation()
        self.conversations.append(conversation)
        decoder = CommandDecoder()
        try:
            while data := await reader.read(1 << 16):
                for command in decoder.feed(data):
                    conversation.commands.append(command)
                    if isinstance(command, cmd.Quit):
                        return
                    replies = None if self.answer is None else self.answer(command, conversation)
                    if isinstance(replies, Close):
                        return
                    if replies is None:
                        replies = self.default(command)
                    if delay := self.delays.get(type(command)):
                        await asyncio.sleep(delay)  # a slow answer, on purpose
                    writer.write(replies if isinstance(replies, bytes) else encode_all(replies))
        except ConnectionError as exc:
            conversation.error = exc
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            conversation.ended.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def all_ended(self) -> None:
        """The barrier after a run: every connection's handler has finished."""
        for conversation in self.conversations:
            await conversation.ended.wait()


@contextlib.asynccontextmanager
async def serving(
    negotiation: r.OptionNegotiationReply,
    answer: Answer | None = None,
    delays: Mapping[type, float] | None = None,
) -> AsyncIterator[FakeMilter]:
    milter = FakeMilter(negotiation, answer, delays)
    await milter.start()
    try:
        yield milter
    finally:
        await milter.stop()
