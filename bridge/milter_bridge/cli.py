"""The ``milter-bridge`` command.

So far it can explain a policy's capabilities: what the bridge would
negotiate with an MTA for them, by libmilter flag name. Serving MTAs
(``--listen`` / ``--upstream``) comes with the runtime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf import json_format

from milter_bridge import __version__
from milter_bridge.protocol.commands import OptionNegotiation
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="milter-bridge",
        description="Speaks milter to Postfix and Sendmail, forwards SMTP events to gRPC policies.",
    )
    parser.add_argument("--version", action="version", version=f"milter-bridge {__version__}")
    parser.add_argument(
        "--explain",
        metavar="CAPABILITIES.json",
        type=Path,
        help="show what would be negotiated with an MTA for these capabilities (proto JSON)",
    )
    parser.add_argument("--offer", choices=sorted(OFFERS), default="v6", help="the MTA's offer")
    args = parser.parse_args(argv)
    if args.explain is None:
        parser.print_help()
        return 2
    try:
        print(explain(args.explain, args.offer))
    except (OSError, json_format.ParseError, InvalidCapabilitiesError) as exc:
        print(f"milter-bridge: --explain {args.explain}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
