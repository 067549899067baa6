"""``milter-bridge probe --connect SPEC``: does a bridge listen and negotiate? (health checks)

Plays the MTA's first step: OPTNEG as Postfix and Sendmail send it, waits for
the reply, then QUIT. Exit status 0 when the bridge answered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from milter_bridge.config import ConfigError, ListenKind, parse_listen
from milter_bridge.protocol import ProtocolError, ReplyDecoder, encode
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag

OFFER = cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF))


async def probe(spec: str, timeout: float) -> str:
    """The negotiated version and flags; raises OSError, TimeoutError or ProtocolError."""
    listen = parse_listen(spec)
    if listen.kind is ListenKind.UNIX:
        connecting = asyncio.open_unix_connection(listen.path)
    else:
        connecting = asyncio.open_connection(listen.host, listen.port)
    reader, writer = await asyncio.wait_for(connecting, timeout)
    try:
        writer.write(encode(OFFER))
        await writer.drain()
        decoder = ReplyDecoder()
        replies: list[r.MilterReply] = []
        while not replies:
            data = await asyncio.wait_for(reader.read(4096), timeout)
            if not data:
                msg = "the bridge closed the connection without answering"
                raise ProtocolError(msg)
            replies = decoder.feed(data)
        reply = replies[0]
        if not isinstance(reply, r.OptionNegotiationReply):
            msg = f"unexpected answer {reply!r}"
            raise ProtocolError(msg)
        writer.write(encode(cmd.Quit()))
        await writer.drain()
        flags = f"actions 0x{int(reply.actions):X}, protocol 0x{int(reply.protocol):X}"
        return f"version {reply.version}, {flags}"
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="milter-bridge probe", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--connect",
        required=True,
        metavar="SPEC",
        help="inet:HOST:PORT, inet6:[ADDR]:PORT or unix:/PATH",
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(probe(args.connect, args.timeout))
    except ConfigError as exc:
        print(f"milter-bridge probe: {exc}".replace("--listen", "--connect"), file=sys.stderr)
        return 2
    except (OSError, TimeoutError, ProtocolError) as exc:
        print(f"milter-bridge probe: {args.connect}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"ok: {args.connect} negotiated {result}")
    return 0
