"""Every setting once: its flag, its MILTER_BRIDGE_* environment variable, its TOML key.

Where a value comes from, strongest first: a command-line flag, the
environment, the TOML file (``--config FILE`` or ``MILTER_BRIDGE_CONFIG``),
the default. An error names the setting as the user wrote it (``--deadline``,
``MILTER_BRIDGE_DEADLINE`` or ``config file /etc/…: deadline``) and says why.
docs/configuration.md is the reference table of these settings (a test keeps
them in step).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from milter_bridge.config import DEFAULT_DEADLINE, DEFAULT_EOM_DEADLINE, STAGES, ConfigError
from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE
from milter_bridge.session.machine import (
    DEFAULT_MAX_BODY_BUFFER,
    DEFAULT_MAX_HEADER_BUFFER,
    DEFAULT_MAX_HEADERS,
)

ENV_PREFIX = "MILTER_BRIDGE_"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # str, int, float, or list for repeatable [STAGE=]VALUE items
    default: object
    metavar: str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


STAGE_NAMES = ", ".join(STAGES)
SETTINGS = (
    Setting(
        "listen",
        str,
        None,
        "SPEC",
        "where MTAs connect: inet:HOST:PORT, inet6:[ADDR]:PORT or unix:/PATH (required)",
    ),
    Setting(
        "upstream",
        str,
        None,
        "TARGET",
        "the policy service: host:port, dns:///name:port, ipv4:A:P,A:P or unix:/path,"
        " round_robin over the addresses; 'embedded' runs the bundled demo policy (required)",
    ),
    Setting("socket_mode", str, None, "OCTAL", "permissions of a unix listen socket, e.g. 660"),
    Setting("socket_group", str, None, "GROUP", "group of a unix listen socket, e.g. postfix"),
    Setting(
        "max_connections",
        int,
        1000,
        "N",
        "MTA connections at once; more are closed with a log line",
    ),
    Setting(
        "deadline",
        list,
        [],
        "[STAGE=]SECONDS",
        f"how long the policy may take to answer; default {DEFAULT_DEADLINE:g} s,"
        f" end_of_message {DEFAULT_EOM_DEADLINE:g} s; stages: {STAGE_NAMES}",
    ),
    Setting(
        "failure_action",
        list,
        [],
        "[STAGE=]ACTION",
        "the answer when the policy cannot give one:"
        " tempfail (default), reject, accept or continue",
    ),
    Setting(
        "describe_wait",
        float,
        2.0,
        "SECONDS",
        "how long an MTA's negotiation waits for capabilities not yet fetched",
    ),
    Setting(
        "describe_refresh",
        float,
        30.0,
        "SECONDS",
        "how often the policy's capabilities are fetched again",
    ),
    Setting(
        "progress_interval",
        float,
        5.0,
        "SECONDS",
        "SMFIR_PROGRESS while the policy works on end of message (below Sendmail's 10 s)",
    ),
    Setting(
        "grace_period", float, 30.0, "SECONDS", "how long connections may finish after SIGTERM"
    ),
    Setting(
        "max_packet_size",
        int,
        DEFAULT_MAX_PACKET_SIZE,
        "BYTES",
        "the largest milter packet accepted from the MTA",
    ),
    Setting(
        "max_body_buffer",
        int,
        DEFAULT_MAX_BODY_BUFFER,
        "BYTES",
        "most body bytes held for a policy that buffers the body",
    ),
    Setting(
        "max_header_buffer",
        int,
        DEFAULT_MAX_HEADER_BUFFER,
        "BYTES",
        "most header bytes held for the policy per message",
    ),
    Setting(
        "max_headers",
        int,
        DEFAULT_MAX_HEADERS,
        "COUNT",
        "most headers held for the policy per message; beyond, headers_truncated",
    ),
    Setting(
        "mta_idle_timeout",
        float,
        7210.0,
        "SECONDS",
        "close an MTA connection silent for this long (libmilter's default)",
    ),
    Setting(
        "metrics_listen",
        str,
        None,
        "HOST:PORT",
        "serve /metrics (Prometheus), /healthz and /readyz over HTTP here; off when unset",
    ),
    Setting(
        "upstream_tls",
        str,
        "off",
        "on|off",
        "TLS to the policy, trusting the system's CAs;"
        " --upstream-ca or --upstream-cert turn it on too",
        ("on", "off"),
    ),
    Setting(
        "upstream_ca",
        str,
        None,
        "FILE",
        "PEM CA certificates the policy's certificate must chain to",
    ),
    Setting(
        "upstream_cert",
        str,
        None,
        "FILE",
        "PEM client certificate for mutual TLS (with --upstream-key)",
    ),
    Setting("upstream_key", str, None, "FILE", "PEM private key of --upstream-cert"),
    Setting(
        "upstream_server_name",
        str,
        None,
        "NAME",
        "the name the policy's certificate must carry, when not the target's host",
    ),
    Setting(
        "upstream_token_file",
        str,
        None,
        "FILE",
        "a token sent as 'authorization: Bearer TOKEN' on every call; read again when it changes",
    ),
    Setting(
        "log_format",
        str,
        "plain",
        "FORMAT",
        "plain lines, or json: one object per line with conn, qid, stage, verdict, latency_ms",
        ("plain", "json"),
    ),
    Setting(
        "log_level",
        str,
        "info",
        "LEVEL",
        "debug, info, warning or error",
        ("debug", "info", "warning", "error"),
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Loaded:
    """The effective values, and where each came from (for messages and check-config)."""

    values: dict[str, object]
    sources: dict[str, str]

    def label(self, name: str) -> str:
        source = self.sources[name]
        setting = BY_NAME[name]
        if source == "flag":
            return setting.flag
        if source == "env":
            return setting.env
        if source == "default":
            return setting.flag
        return f"{source}: {name}"


def _convert(setting: Setting, raw: object, label: str) -> object:
    try:
        if setting.kind is list:
            if isinstance(raw, str):
                return [item.strip() for item in raw.split(",") if item.strip()]
            if isinstance(raw, list):
                return [str(item) for item in raw]
            if isinstance(raw, dict):  # TOML table: {default = 8, end_of_message = 120}
                items = [str(raw.pop("default"))] if "default" in raw else []
                return items + [f"{stage}={value}" for stage, value in raw.items()]
            raise TypeError
        if setting.kind is int and not isinstance(raw, bool):
            return int(raw)  # type: ignore[call-overload]
        if setting.kind is float and not isinstance(raw, bool):
            return float(raw)  # type: ignore[arg-type]
        if setting.kind is str and isinstance(raw, str | int):
            value = str(raw)
            if setting.choices and value not in setting.choices:
                msg = f"{label}: {value!r} is not one of {', '.join(setting.choices)}"
                raise ConfigError(msg)
            return value
        raise TypeError
    except ConfigError:
        raise
    except (TypeError, ValueError):
        kinds = {int: "a whole number", float: "a number", str: "text", list: "a list"}
        msg = f"{label}: {raw!r} is not {kinds[setting.kind]}"
        raise ConfigError(msg) from None


def _read_file(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        msg = f"config file {path}: cannot be read: {exc.strerror}"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {path}: not valid TOML: {exc}"
        raise ConfigError(msg) from None
    unknown = sorted(set(data) - set(BY_NAME))
    if unknown:
        msg = f"config file {path}: unknown setting {unknown[0]!r} (settings: {', '.join(BY_NAME)})"
        raise ConfigError(msg)
    return data


def load(
    flags: Mapping[str, object], environ: Mapping[str, str], config_file: Path | None
) -> Loaded:
    """``flags``: the values given on the command line (None or absent: not given)."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    file_values = _read_file(config_file) if config_file is not None else {}
    for setting in SETTINGS:
        if flags.get(setting.name) not in (None, []):
            values[setting.name], sources[setting.name] = flags[setting.name], "flag"
        elif setting.env in environ:
            values[setting.name] = _convert(setting, environ[setting.env], setting.env)
            sources[setting.name] = "env"
        elif setting.name in file_values:
            label = f"config file {config_file}: {setting.name}"
            values[setting.name] = _convert(setting, file_values[setting.name], label)
            sources[setting.name] = f"config file {config_file}"
        else:
            values[setting.name], sources[setting.name] = setting.default, "default"
    return Loaded(values, sources)
