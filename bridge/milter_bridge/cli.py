"""The ``milter-bridge`` command: flags, environment, TOML file -> Config -> the server.

    milter-bridge --listen inet:127.0.0.1:8890 --upstream policy:50051

``--explain CAPS.json`` instead shows what would be negotiated with an MTA
for a policy's capabilities, by libmilter flag name.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from google.protobuf import json_format

from milter_bridge import __version__, logs, probe
from milter_bridge.config import Config, ConfigError, warnings_for
from milter_bridge.embedded import EMBEDDED, embedded_policy
from milter_bridge.load import command as load_command
from milter_bridge.protocol.commands import OptionNegotiation
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.server.bridge import StartError, run, serve
from milter_bridge.server.workers import supervise
from milter_bridge.session.negotiation import negotiate
from milter_bridge.session.plan import InvalidCapabilitiesError, Plan
from milter_bridge.session.stages import NO_FLAG, Mode, Stage
from milter_bridge.settings import SETTINGS, Loaded, load
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
        epilog=(
            "Every setting can also come from the environment (MILTER_BRIDGE_LISTEN, ...) or a"
            " TOML file (--config); a flag wins over the environment, which wins over the file."
            " Subcommands: probe --connect SPEC; check-config [settings]; load TARGET (load and"
            " check any milter as Postfix would, see load --help)."
        ),
        description="Speaks milter to Postfix and Sendmail, forwards SMTP events to gRPC policies.",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"milter-bridge {__version__}")
    add(
        "--config",
        metavar="FILE.toml",
        type=Path,
        help="settings from a TOML file (env MILTER_BRIDGE_CONFIG)",
    )
    for setting in SETTINGS:
        default = setting.shown_default
        shown = "" if default is None else f" (default: {default})"
        add(
            setting.flag,
            dest=setting.name,
            default=None,
            metavar=setting.metavar,
            action="append" if setting.repeatable else "store",
            help=f"{setting.help}{shown} [{setting.env}]".replace("%", "%%"),
        )
    add(
        "--explain",
        metavar="CAPABILITIES.json",
        type=Path,
        help="show what would be negotiated with an MTA for these capabilities and exit",
    )
    add("--offer", choices=sorted(OFFERS), default="v6", help="the MTA offer for --explain")
    return parser


def load_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Loaded:
    environ = dict(os.environ) if environ is None else environ
    config_file = args.config or (
        Path(environ["MILTER_BRIDGE_CONFIG"]) if environ.get("MILTER_BRIDGE_CONFIG") else None
    )
    return load({s.name: getattr(args, s.name) for s in SETTINGS}, environ, config_file)


def config_from(loaded: Loaded) -> Config:
    """Raises ConfigError naming the setting as the user gave it (flag, variable or file)."""
    return loaded.config()


def check_config(argv: list[str]) -> int:
    """``milter-bridge check-config [settings]``: validate and show the effective settings."""
    args = _parser().parse_args(argv)
    try:
        loaded = load_settings(args)
        config = config_from(loaded)
    except ConfigError as exc:
        print(f"milter-bridge: {exc}", file=sys.stderr)
        return 2
    for setting in SETTINGS:
        shown = setting.show(getattr(config, setting.field))
        print(f"{setting.name} = {shown!r}  ({loaded.sources[setting.name]})")
    for warning in warnings_for(config):
        print(f"warning: {warning}")
    print("configuration is valid")
    return 0


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 - one exit per outcome
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe.main(argv[1:])
    if argv[:1] == ["load"]:
        return load_command.main(argv[1:])
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])
    args = _parser().parse_args(argv)
    if args.explain is not None:
        try:
            print(explain(args.explain, args.offer))
        except (OSError, json_format.ParseError, InvalidCapabilitiesError) as exc:
            print(f"milter-bridge: --explain {args.explain}: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        config = config_from(load_settings(args))
    except ConfigError as exc:
        print(f"milter-bridge: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
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
    except StartError as exc:  # e.g. the listen address is taken
        print(f"milter-bridge: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(config: Config) -> None:
    if config.workers > 1:
        supervise(config)
    else:
        run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
