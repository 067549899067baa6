"""The ``milter-bridge`` command: flags -> Config -> the server.

    milter-bridge --listen inet:127.0.0.1:8890 --upstream policy:50051

``--explain CAPS.json`` instead shows what would be negotiated with an MTA
for a policy's capabilities, by libmilter flag name.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from google.protobuf import json_format

from milter_bridge import __version__, probe
from milter_bridge.config import (
    DEFAULT_DEADLINE,
    DEFAULT_EOM_DEADLINE,
    STAGES,
    Config,
    ConfigError,
    default_deadlines,
    default_failure_actions,
    parse_deadlines,
    parse_failure_actions,
    parse_listen,
    warnings_for,
)
from milter_bridge.embedded import EMBEDDED, embedded_policy
from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE
from milter_bridge.protocol.commands import OptionNegotiation
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.server.bridge import serve
from milter_bridge.session import FailureAction
from milter_bridge.session.machine import DEFAULT_MAX_BODY_BUFFER, DEFAULT_MAX_HEADER_BUFFER
from milter_bridge.session.negotiation import NO_FLAG, negotiate
from milter_bridge.session.plan import InvalidCapabilitiesError, Mode, Plan, Stage
from milter_bridge.v1 import policy_pb2 as pb

# What real MTAs offer (see tests/fixtures/captured/README.md).
OFFERS = {
    "v6": OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF)),
    "postfix-v2": OptionNegotiation(2, ActionFlag(0x1FF), ProtocolFlag(0x7F)),
}


def _names(flags: ActionFlag | ProtocolFlag) -> str:
    return " | ".join(f.name or "" for f in type(flags) if f and f in flags) or "none"


def explain(path: Path, offer: str) -> str:
    """The negotiation for the Capabilities (or DescribeResponse) in a JSON file."""
    text = path.read_text()
    try:
        response = json_format.Parse(text, pb.DescribeResponse())
        caps, fingerprint = response.capabilities, response.fingerprint
    except json_format.ParseError:
        caps, fingerprint = json_format.Parse(text, pb.Capabilities()), ""
    neg = negotiate(Plan.from_capabilities(caps, fingerprint), OFFERS[offer])
    lines = [
        f"MTA offer ({offer}): version {OFFERS[offer].version}",
        f"version:  {neg.reply.version}",
        f"actions:  0x{int(neg.reply.actions):X} {_names(neg.reply.actions)}",
        f"protocol: 0x{int(neg.reply.protocol):X} {_names(neg.reply.protocol)}",
    ]
    lines += [f"macros:   stage {s.name}: {names.decode()}" for s, names in neg.reply.macros]
    for stage, mode in neg.modes.items():
        if stage in NO_FLAG and neg.reply.protocol & NO_FLAG[stage]:
            how = "not sent by the MTA"
        elif stage is Stage.ABORT or stage in neg.no_reply:
            how = "sent, the MTA does not wait"
        elif mode is Mode.DECIDE:
            how = "sent, the MTA waits for the policy"
        else:
            how = "sent, the bridge answers at once"
        lines.append(f"event {stage.value:15} {mode.name:8} {how}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milter-bridge",
        epilog="milter-bridge probe --connect SPEC: check that a bridge listens and negotiates.",
        description="Speaks milter to Postfix and Sendmail, forwards SMTP events to gRPC policies.",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"milter-bridge {__version__}")
    add("--listen", metavar="SPEC", help="inet:HOST:PORT, inet6:[ADDR]:PORT or unix:/PATH")
    add(
        "--upstream",
        metavar="TARGET",
        help="the policy service: host:port, dns:///name:port, "
        "ipv4:ADDR:PORT,ADDR:PORT or unix:/path (round_robin over the addresses)",
    )
    add("--socket-mode", metavar="OCTAL", help="permissions of the unix socket, e.g. 660")
    add("--socket-group", metavar="GROUP", help="group of the unix socket, e.g. postfix")
    add("--max-connections", type=int, default=1000, metavar="N")
    add(
        "--deadline",
        action="append",
        default=[],
        metavar="[STAGE=]SECONDS",
        help=f"how long the policy may take to answer (default {DEFAULT_DEADLINE:g}s, "
        f"end_of_message {DEFAULT_EOM_DEADLINE:g}s); repeatable; stages: {', '.join(STAGES)}",
    )
    add(
        "--failure-action",
        action="append",
        default=[],
        metavar="[STAGE=]ACTION",
        help="tempfail (default), reject, accept or continue, when the policy cannot answer",
    )
    add(
        "--describe-wait",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long an MTA's negotiation waits for capabilities not yet fetched",
    )
    add("--describe-refresh", type=float, default=30.0, metavar="SECONDS")
    add(
        "--progress-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="SMFIR_PROGRESS while the policy works on end of message",
    )
    add(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long connections may finish after SIGTERM",
    )
    add("--max-packet-size", type=int, default=DEFAULT_MAX_PACKET_SIZE, metavar="BYTES")
    add(
        "--max-body-buffer",
        type=int,
        default=DEFAULT_MAX_BODY_BUFFER,
        metavar="BYTES",
        help="most body bytes held for a policy that buffers the body",
    )
    add(
        "--max-header-buffer",
        type=int,
        default=DEFAULT_MAX_HEADER_BUFFER,
        metavar="BYTES",
        help="most header bytes held for the policy per message",
    )
    add(
        "--mta-idle-timeout",
        type=float,
        default=7210.0,
        metavar="SECONDS",
        help="close an MTA connection silent for this long (libmilter's default)",
    )
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add(
        "--explain",
        metavar="CAPABILITIES.json",
        type=Path,
        help="show what would be negotiated with an MTA for these capabilities and exit",
    )
    add("--offer", choices=sorted(OFFERS), default="v6", help="the MTA offer for --explain")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    """Raises ConfigError naming the flag."""
    if not args.listen:
        msg = "--listen: required, e.g. inet:127.0.0.1:8890 or unix:/run/milter-bridge.sock"
        raise ConfigError(msg)
    mode = None
    if args.socket_mode is not None:
        try:
            mode = int(args.socket_mode, 8)
        except ValueError:
            msg = f"--socket-mode: {args.socket_mode!r} is not an octal mode like 660"
            raise ConfigError(msg) from None
    deadlines: dict[Stage, float] = default_deadlines()
    deadlines.update(parse_deadlines(args.deadline))
    actions: dict[Stage, FailureAction] = default_failure_actions()
    actions.update(parse_failure_actions(args.failure_action))
    return Config(
        listen=parse_listen(args.listen),
        upstream=args.upstream or "",
        socket_mode=mode,
        socket_group=args.socket_group,
        max_connections=args.max_connections,
        deadlines=deadlines,
        failure_actions=actions,
        describe_wait=args.describe_wait,
        describe_refresh=args.describe_refresh,
        progress_interval=args.progress_interval,
        grace_period=args.grace_period,
        max_packet_size=args.max_packet_size,
        max_body_buffer=args.max_body_buffer,
        max_header_buffer=args.max_header_buffer,
        mta_idle_timeout=args.mta_idle_timeout,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.explain is not None:
        try:
            print(explain(args.explain, args.offer))
        except (OSError, json_format.ParseError, InvalidCapabilitiesError) as exc:
            print(f"milter-bridge: --explain {args.explain}: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        config = config_from(args)
    except ConfigError as exc:
        print(f"milter-bridge: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for warning in warnings_for(config):
        logging.getLogger("milter_bridge").warning("%s", warning)
    try:
        if config.upstream == EMBEDDED:
            logging.getLogger("milter_bridge").warning(
                "--upstream embedded: running the bundled demo policy (stamps a header)"
            )
            with embedded_policy() as target:
                _run(replace(config, upstream=target))
        else:
            _run(config)
    except OSError as exc:  # e.g. the listen address is taken
        print(f"milter-bridge: --listen {config.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(config: Config) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
