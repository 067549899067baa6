"""``milter-bridge probe --connect SPEC``: does a bridge listen and negotiate? (health checks)

Plays the MTA's first step: OPTNEG as Postfix and Sendmail send it, waits for
the reply, then QUIT. Exit status 0 when the bridge answered, 1 otherwise.

Whether the bridge knows its policy's capabilities shows in the answer: without
them it negotiates the minimum (no actions, every event but CONNECT off). With
``--require-policy`` that answer fails the probe too (a readiness check); a
policy that itself asks for nothing but CONNECT and no actions looks the same.
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
from milter_bridge.session import Plan, Session
from milter_bridge.session.machine import SendToMta

OFFER = cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF))


def _minimum() -> r.OptionNegotiationReply:
    """What a bridge without policy capabilities answers to OFFER."""
    outputs = Session(Plan.unavailable()).feed(encode(OFFER))
    data = b"".join(o.data for o in outputs if isinstance(o, SendToMta))
    (reply,) = ReplyDecoder().feed(data)
    assert isinstance(reply, r.OptionNegotiationReply)
    return reply


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
        minimum = _minimum()
        if (reply.actions, reply.protocol) == (minimum.actions, minimum.protocol):
            return f"version {reply.version}, {flags}; no policy capabilities known"
        return f"version {reply.version}, {flags}; policy capabilities known"
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
    parser.add_argument(
        "--require-policy",
        action="store_true",
        help="fail (exit 1) when the bridge does not know its policy's capabilities",
    )
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(probe(args.connect, args.timeout))
    except ConfigError as exc:
        print(f"milter-bridge probe: {exc}".replace("--listen", "--connect"), file=sys.stderr)
        return 2
    except (OSError, TimeoutError, ProtocolError) as exc:
        print(f"milter-bridge probe: {args.connect}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if args.require_policy and result.endswith("no policy capabilities known"):
        print(f"milter-bridge probe: {args.connect} negotiated {result}", file=sys.stderr)
        return 1
    print(f"ok: {args.connect} negotiated {result}")
    return 0
