"""``python -m bench.session``: the sans-I/O session alone, per benchmark message.

No sockets, no gRPC, no event loop: one Session per message, fed the packets the
load tool sends for one benchmark message (OPTNEG; the D packets of every stage
with Postfix's macros; 10 headers without reply, end of headers, a 10 KB body,
end of message; ABORT and QUIT), answered with the benchmark policy's answer
(continue, add ``X-Bench: 1``). Prints the microseconds of one message: the best
of ``--batches`` batches of ``--messages`` each (the best, because on a shared
machine the others measure the neighbours). ``--profile`` adds cProfile's top
functions. Each message's replies are checked.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from milter_bridge.protocol import ReplyDecoder, encode, encode_all
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.session import Plan, SendToMta, Session
from milter_bridge.v1 import policy_pb2 as pb

SKIP, DECIDE = pb.EVENT_MODE_SKIP, pb.EVENT_MODE_DECIDE


def bench_plan() -> Plan:
    """What bench/sdk_policy.py describes: end of message with the headers, add_header."""
    modes = {f.name: SKIP for f in pb.EventModes.DESCRIPTOR.fields}
    modes["end_of_message"] = DECIDE
    caps = pb.Capabilities(
        events=pb.EventModes(**modes),
        header_delivery=pb.HEADER_DELIVERY_EACH,
        body_delivery=pb.BODY_DELIVERY_NONE,
        end_of_message_content=pb.EndOfMessageContent(headers=True),
        actions=pb.Actions(add_header=True),
    )
    return Plan.from_capabilities(caps, "bench")


def message_packets() -> tuple[bytes, bytes, bytes]:
    """OPTNEG, the message up to end of message, and ABORT + QUIT, as Postfix 3.7 sends."""
    optneg = encode(cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF)))
    headers = [cmd.Header(b"X-Header-%d" % i, b"value %d of the benchmark" % i) for i in range(9)]
    commands: list[cmd.MtaCommand] = [
        cmd.DefineMacro(b"C", ((b"j", b"mx.example.test"), (b"{daemon_name}", b"smtpd"))),
        cmd.DefineMacro(b"H", ()),
        cmd.DefineMacro(b"M", ((b"{mail_addr}", b"sender@example.test"),)),
        cmd.DefineMacro(b"R", ((b"{rcpt_addr}", b"rcpt@example.test"), (b"i", b"QID1"))),
        cmd.DefineMacro(b"T", ((b"i", b"QID1"),)),
        *headers,
        cmd.Header(b"Subject", b"benchmark message"),
        cmd.DefineMacro(b"N", ()),
        cmd.EndOfHeaders(),
        cmd.Body(b"x" * 10240),
        cmd.DefineMacro(b"E", ((b"i", b"QID1"),)),
        cmd.EndOfMessage(),
    ]
    end: list[cmd.MtaCommand] = [cmd.Abort(), cmd.Quit()]
    return optneg, encode_all(commands), encode_all(end)


ANSWER = pb.ProcessResponse(
    sequence=2,
    end_of_message=pb.EndOfMessageResponse(
        verdict=pb.Verdict(action=pb.ACTION_CONTINUE),
        modifications=[pb.Modification(add_header=pb.AddHeader(name="X-Bench", value=b"1"))],
    ),
)
EXPECTED = [r.AddHeader(b"X-Bench", b"1"), r.Continue()]


def one_message(plan: Plan, packets: tuple[bytes, bytes, bytes]) -> list[SendToMta]:
    optneg, message, end = packets
    session = Session(plan, connection_id="bench")
    session.feed(optneg)
    session.feed(message)
    outputs = session.answer(ANSWER)
    session.feed(end)
    return [o for o in outputs if isinstance(o, SendToMta)]


def check(plan: Plan, packets: tuple[bytes, bytes, bytes]) -> None:
    (write,) = one_message(plan, packets)
    replies = ReplyDecoder().feed(write.data)
    if replies != EXPECTED:
        msg = f"the session answered {replies!r}, not {EXPECTED!r}"
        raise SystemExit(msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__)
    parser.add_argument("--messages", type=int, default=1500, help="per batch (default 1500)")
    parser.add_argument("--batches", type=int, default=7, help="the best is shown (default 7)")
    parser.add_argument("--profile", action="store_true", help="also cProfile's top functions")
    args = parser.parse_args(argv)
    plan, packets = bench_plan(), message_packets()
    check(plan, packets)
    best = float("inf")
    for _ in range(args.batches):
        started = time.perf_counter()
        for _ in range(args.messages):
            one_message(plan, packets)
        best = min(best, (time.perf_counter() - started) / args.messages)
    print(f"session alone: {best * 1e6:.1f} µs per message (best of {args.batches} batches)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [one_message(plan, packets) for _ in range(args.messages)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
