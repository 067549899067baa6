"""``milter-bridge load TARGET``: load a milter as Postfix would, and check every answer.

Exit status: 0 when every answer was valid, 1 after a protocol error or a
connection that could not be made, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction

from milter_bridge.config import ConfigError
from milter_bridge.load.abandon import HOWS
from milter_bridge.load.run import LoadConfig, LoadConfigError, run_sync, stderr_if_tty
from milter_bridge.load.shape import Shape, ShapeError

DESCRIPTION = """\
Plays the MTA side the way Postfix 3.7 does (milter_protocol=6) against any
milter (libmilter, pymilter, milter-bridge): OPTNEG offering version 6, then
only the events the milter asked for, with Postfix's macros, ABORT after
every message. Reports msg/s, latency percentiles, the worst single answer,
outcomes, modifications and protocol errors (malformed or invalid answers,
answers to events without reply, connections closed or silent while the MTA
waits). With --abandon-share, some messages end with the MTA going away
mid-message instead (outcome "abandoned STAGE fin|rst"), which is no error."""


def _fraction(text: str) -> Fraction:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        msg = f"{text!r} is not a fraction such as 0.1 or 1/10"
        raise argparse.ArgumentTypeError(msg) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milter-bridge load", description=DESCRIPTION)
    add = p.add_argument
    add("target", metavar="TARGET", help="inet:HOST:PORT, inet6:[ADDR]:PORT or unix:/PATH")
    how_long = p.add_mutually_exclusive_group()
    how_long.add_argument("--count", type=int, metavar="N", help="send N messages")
    how_long.add_argument(
        "--duration", type=float, metavar="SECONDS", help="send messages for this long (default 10)"
    )
    add("--concurrency", type=int, default=1, metavar="N", help="connections at once (default 1)")
    add(
        "--messages-per-connection",
        type=int,
        default=1,
        metavar="N",
        help="messages on one milter connection before QUIT (default 1)",
    )
    add("--headers", type=int, default=10, metavar="N", help="headers per message (default 10)")
    add("--body-size", type=int, default=10240, metavar="BYTES", help="(default 10240)")
    add("--recipients", type=int, default=1, metavar="N", help="per message (default 1)")
    add(
        "--marker-share",
        type=_fraction,
        default=Fraction(0),
        metavar="FRACTION",
        help="share of messages whose Subject carries --marker, every k-th (default 0)",
    )
    add("--marker", default="REJECT", metavar="TEXT", help="(default REJECT)")
    add(
        "--abandon-share",
        type=_fraction,
        default=Fraction(0),
        metavar="FRACTION",
        help="share of messages the MTA leaves mid-way, ending the connection: every k-th"
        " (never a marked one when both shares are the same 1/n); in turn after MAIL, RCPT,"
        " DATA, in the headers, after end of headers, in the body, after end of message,"
        " where negotiated (default 0)",
    )
    add(
        "--abandon",
        choices=HOWS,
        default="fin",
        help="how that connection ends: fin (a normal close) or rst (SO_LINGER 0 s: a TCP"
        " reset; a unix socket has none: unsent data is dropped, then closed) (default fin)",
    )
    add(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="for each answer and to connect (default 30, Postfix's milter_command_timeout)",
    )
    add("--json", action="store_true", help="print the report as one JSON object")
    add("--quiet", action="store_true", help="no progress line on stderr")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        shape = Shape(
            headers=args.headers,
            body_size=args.body_size,
            recipients=args.recipients,
            marker_share=args.marker_share,
            marker=args.marker,
        )
        config = LoadConfig(
            target=args.target,
            count=args.count,
            duration=10.0 if args.count is None and args.duration is None else args.duration,
            concurrency=args.concurrency,
            messages_per_connection=args.messages_per_connection,
            timeout=args.timeout,
            shape=shape,
            abandon_share=args.abandon_share,
            abandon=args.abandon,
        )
        report = run_sync(config, progress=stderr_if_tty(quiet=args.quiet))
    except (ShapeError, LoadConfigError) as exc:
        print(f"milter-bridge load: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"milter-bridge load: {exc}".replace("--listen", "TARGET"), file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.text())
    return 0 if report.ok else 1
