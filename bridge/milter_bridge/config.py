"""One Config object holding every setting, validated once, with errors that name the setting.

Defaults and why:

- Deadlines for the policy's answer stay below what the MTAs allow: Sendmail's
  default milter timeouts are 10 s per read (T=R:10s) and 5 minutes from end of
  message (E:5m); Postfix allows 30 s per command and 300 s per content read.
  So 8 s per event and 120 s for end of message, during which the bridge sends
  SMFIR_PROGRESS every 5 s (Sendmail's read timer restarts on each packet).
- Failure action tempfail everywhere: a broken policy defers mail, never loses
  or lets it through unless the operator says so.
"""

from __future__ import annotations

import grp
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE
from milter_bridge.session import FailureAction, Stage
from milter_bridge.session.machine import (
    DEFAULT_MAX_BODY_BUFFER,
    DEFAULT_MAX_HEADER_BUFFER,
    DEFAULT_MAX_HEADERS,
)

# Stages that can await the policy, by their names in the proto and on the command line.
STAGES: dict[str, Stage] = {s.value: s for s in Stage if s is not Stage.ABORT}
DEFAULT_DEADLINE = 8.0
DEFAULT_EOM_DEADLINE = 120.0
SENDMAIL_READ_TIMEOUT = 10.0  # INPUT_MAIL_FILTER T=R: default
MTA_EOM_LIMIT = 300.0  # Sendmail T=E:5m; Postfix milter_content_timeout
_T = TypeVar("_T")


class ConfigError(ValueError):
    """A setting that cannot be used; the message starts with the setting's name."""


class ListenKind(Enum):
    INET = "inet"
    INET6 = "inet6"
    UNIX = "unix"


@dataclass(frozen=True, slots=True)
class Listen:
    """Where the bridge accepts MTA connections."""

    kind: ListenKind
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind is ListenKind.UNIX:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.kind is ListenKind.INET6 else self.host
        return f"{self.kind.value}:{host}:{self.port}"


_INET = re.compile(r"inet:(?P<host>[^:\[\]]+):(?P<port>\d+)")
_INET6 = re.compile(r"inet6:\[(?P<host>[0-9A-Fa-f:.]+)\]:(?P<port>\d+)")


def parse_listen(text: str) -> Listen:
    """``inet:127.0.0.1:8890``, ``inet6:[::1]:8890`` or ``unix:/run/milter-bridge.sock``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            msg = f"--listen: {text!r}: the unix socket path must be absolute"
            raise ConfigError(msg)
        return Listen(ListenKind.UNIX, path=path)
    match = _INET.fullmatch(text) or _INET6.fullmatch(text)
    if match is None:
        msg = f"--listen: {text!r} is not inet:HOST:PORT, inet6:[ADDRESS]:PORT or unix:/PATH"
        raise ConfigError(msg)
    port = int(match["port"])
    if not 0 <= port <= 65535:
        msg = f"--listen: port {port} is out of range"
        raise ConfigError(msg)
    kind = ListenKind.INET6 if text.startswith("inet6:") else ListenKind.INET
    return Listen(kind, host=match["host"], port=port)


def default_deadlines() -> dict[Stage, float]:
    deadlines = dict.fromkeys(STAGES.values(), DEFAULT_DEADLINE)
    deadlines[Stage.EOM] = DEFAULT_EOM_DEADLINE
    return deadlines


def default_failure_actions() -> dict[Stage, FailureAction]:
    return dict.fromkeys(STAGES.values(), FailureAction.TEMPFAIL)


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of one bridge process."""

    listen: Listen
    upstream: str
    socket_mode: int | None = None
    socket_group: str | None = None
    max_connections: int = 1000
    deadlines: Mapping[Stage, float] = field(default_factory=default_deadlines)
    failure_actions: Mapping[Stage, FailureAction] = field(default_factory=default_failure_actions)
    # How long an MTA's option negotiation may wait for capabilities not yet fetched.
    describe_wait: float = 2.0
    describe_refresh: float = 30.0
    progress_interval: float = 5.0
    grace_period: float = 30.0
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_body_buffer: int = DEFAULT_MAX_BODY_BUFFER
    max_header_buffer: int = DEFAULT_MAX_HEADER_BUFFER
    max_headers: int = DEFAULT_MAX_HEADERS
    # libmilter's default: an MTA that sends nothing for this long is gone.
    mta_idle_timeout: float = 7210.0
    # HOST:PORT of the HTTP endpoint for metrics and health; None: off.
    metrics_listen: str | None = None
    log_level: str = "info"
    log_format: str = "plain"  # or "json"
    # TLS to the policy: on with system roots, or with this CA; a client
    # certificate and key for mutual TLS; the name its certificate must carry.
    upstream_tls: bool = False
    upstream_ca: str | None = None
    upstream_cert: str | None = None
    upstream_key: str | None = None
    upstream_server_name: str | None = None
    # A file holding a token sent as "authorization: Bearer <token>" on every call.
    upstream_token_file: str | None = None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of --metrics-listen; port -1 when it is not a number."""
        if self.metrics_listen is None:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else -1

    @property
    def tls(self) -> bool:
        return self.upstream_tls or self.upstream_ca is not None or self.upstream_cert is not None

    def __post_init__(self) -> None:
        _positive("--max-connections", self.max_connections)
        for name in ("describe_wait", "describe_refresh", "progress_interval", "mta_idle_timeout"):
            _positive(f"--{name.replace('_', '-')}", getattr(self, name))
        if not 0 <= self.grace_period < math.inf:
            msg = f"--grace-period: {self.grace_period} is not a number of seconds"
            raise ConfigError(msg)
        if self.progress_interval >= SENDMAIL_READ_TIMEOUT:
            msg = (
                f"--progress-interval: {self.progress_interval:g}s is too long: Sendmail gives up"
                f" on a milter silent for {SENDMAIL_READ_TIMEOUT:g}s (T=R:10s)"
            )
            raise ConfigError(msg)
        if self.socket_group is not None:
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                msg = f"--socket-group: no group named {self.socket_group!r}"
                raise ConfigError(msg) from None
        _positive("--max-packet-size", self.max_packet_size)
        _positive("--max-body-buffer", self.max_body_buffer)
        _positive("--max-header-buffer", self.max_header_buffer)
        _positive("--max-headers", self.max_headers)
        for stage, seconds in self.deadlines.items():
            _positive(f"--deadline {stage.value}", seconds)
        if not self.upstream:
            msg = "--upstream: a gRPC target is required, e.g. policy:50051 or dns:///policy:50051"
            raise ConfigError(msg)
        if self.socket_mode is not None and not 0 <= self.socket_mode <= 0o777:
            msg = f"--socket-mode: {self.socket_mode:o} is not a permission mode"
            raise ConfigError(msg)
        if self.metrics_listen is not None:
            host, port = self.metrics_address or ("", -1)
            if not host or not 0 <= port <= 65535:
                msg = f"--metrics-listen: {self.metrics_listen!r} is not HOST:PORT"
                raise ConfigError(msg)
        if self.log_level not in ("debug", "info", "warning", "error"):
            msg = f"--log-level: {self.log_level!r} is not debug, info, warning or error"
            raise ConfigError(msg)
        if self.log_format not in ("plain", "json"):
            msg = f"--log-format: {self.log_format!r} is not plain or json"
            raise ConfigError(msg)
        self._check_upstream_security()

    def _check_upstream_security(self) -> None:
        if (self.upstream_cert is None) != (self.upstream_key is None):
            given, missing = (
                ("--upstream-cert", "--upstream-key")
                if self.upstream_key is None
                else ("--upstream-key", "--upstream-cert")
            )
            msg = f"{given}: mutual TLS needs {missing} too"
            raise ConfigError(msg)
        if self.upstream_server_name is not None and not self.tls:
            msg = "--upstream-server-name: only with TLS (--upstream-tls on or --upstream-ca)"
            raise ConfigError(msg)
        _pem("--upstream-ca", self.upstream_ca, "certificate", _PEM_CERTIFICATE)
        _pem("--upstream-cert", self.upstream_cert, "certificate", _PEM_CERTIFICATE)
        _pem("--upstream-key", self.upstream_key, "private key", _PEM_KEY)
        token = self.upstream_token_file
        if token is not None and not _read("--upstream-token-file", token).strip():
            msg = f"--upstream-token-file: {token} is empty"
            raise ConfigError(msg)


def _positive(name: str, value: float) -> None:
    if not 0 < value < math.inf:
        msg = f"{name}: {value} must be greater than 0 and finite"
        raise ConfigError(msg)


def warnings_for(config: Config) -> list[str]:
    """Settings that work but exceed what MTAs allow by default (logged at start)."""
    out = []
    for stage, seconds in config.deadlines.items():
        limit = MTA_EOM_LIMIT if stage is Stage.EOM else SENDMAIL_READ_TIMEOUT
        if seconds >= limit:
            out.append(
                f"--deadline {stage.value}={seconds:g}: the MTA may give up first (Sendmail's"
                f" defaults: 10 s per read, 5 min from end of message; Postfix: 30 s per"
                f" command, 300 s per read)"
            )
    return out


def _staged(
    flag: str, values: list[str], convert: Callable[[str], _T], kinds: str
) -> dict[Stage, _T]:
    """``[STAGE=]VALUE`` items: without a stage the value applies to every stage, in order."""
    out: dict[Stage, _T] = {}
    for item in values:
        stage_name, sep, raw = item.rpartition("=")
        stages = list(STAGES.values())
        if sep:
            if stage_name not in STAGES:
                msg = f"{flag}: unknown stage {stage_name!r} (one of {', '.join(STAGES)})"
                raise ConfigError(msg)
            stages = [STAGES[stage_name]]
        try:
            value = convert(raw)
        except (KeyError, ValueError):
            msg = f"{flag}: {raw!r} is not {kinds}"
            raise ConfigError(msg) from None
        for stage in stages:
            out[stage] = value
    return out


def parse_deadlines(values: list[str]) -> dict[Stage, float]:
    return _staged("--deadline", values, float, "a number of seconds")


def parse_failure_actions(values: list[str]) -> dict[Stage, FailureAction]:
    def convert(raw: str) -> FailureAction:
        return FailureAction[raw.upper()]

    return _staged("--failure-action", values, convert, "tempfail, reject, accept or continue")


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as exc:
        msg = f"{flag}: cannot read {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from None


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE")
_PEM_KEY = re.compile(r"-----BEGIN (?:RSA |EC )?PRIVATE KEY")  # PKCS#8, PKCS#1 or SEC 1


def _pem(flag: str, path: str | None, kind: str, marker: re.Pattern[str]) -> None:
    """Checked at start, so that a wrong file stops the bridge instead of failing every call."""
    if path is not None and not marker.search(_read(flag, path)):
        msg = f"{flag}: {path} holds no PEM {kind}"
        raise ConfigError(msg)
