"""One Config object holding every setting, validated once, with errors that name the setting.

Each field declares its setting (``options.option``): type, default, parser,
check, metavar and help; the command line, the MILTER_BRIDGE_* environment and
the TOML file (``settings.py``) fill exactly these fields, and whatever they
leave out keeps the field's default, so ``Config(listen=..., upstream=...)``
and the program agree.

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

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from milter_bridge.options import (
    MAX_WORKERS,
    PEM_CERTIFICATE,
    PEM_KEY,
    check_all,
    existing_group,
    host_and_port,
    host_port,
    items,
    member,
    nonempty_file,
    number,
    octal,
    on_off,
    one_of,
    option,
    pem_file,
    permission_mode,
    positive,
    seconds_or_zero,
    settings_class,
    show_octal,
    show_on_off,
    stream_count,
    text,
    whole,
    whole_or_auto,
    worker_count,
)
from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE
from milter_bridge.session import FailureAction, Stage
from milter_bridge.session.machine import (
    DEFAULT_MAX_BODY_BUFFER,
    DEFAULT_MAX_HEADER_BUFFER,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_RECIPIENT_BUFFER,
    DEFAULT_MAX_RECIPIENTS,
)

# Stages that can await the policy, by their names in the proto and on the command line.
STAGES: dict[str, Stage] = {s.value: s for s in Stage if s is not Stage.ABORT}
DEFAULT_DEADLINE = 8.0
DEFAULT_EOM_DEADLINE = 120.0
SENDMAIL_READ_TIMEOUT = 10.0  # INPUT_MAIL_FILTER T=R: default
MTA_EOM_LIMIT = 300.0  # Sendmail T=E:5m; Postfix milter_content_timeout
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("plain", "json")
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


# Parsers of what users write, and checks of values, for the settings below.


def _listen(raw: object) -> Listen:
    spec = text(raw)
    if not spec:
        msg = "required, e.g. inet:127.0.0.1:8890 or unix:/run/milter-bridge.sock"
        raise ValueError(msg)
    return parse_listen(spec)


def _deadlines(raw: object) -> dict[Stage, float]:
    return default_deadlines() | parse_deadlines(items(raw))


def _failure_actions(raw: object) -> dict[Stage, FailureAction]:
    return default_failure_actions() | parse_failure_actions(items(raw))


def _show_staged(values: Mapping[Stage, object]) -> str:
    """``8,end_of_message=120``: the most common value, then the stages that differ."""

    def word(value: object) -> str:
        if isinstance(value, Enum):
            return value.name.lower()
        return f"{value:g}" if isinstance(value, float) else str(value)

    if not values:
        return ""
    common = Counter(values.values()).most_common(1)[0][0]
    rest = [f"{stage.value}={word(v)}" for stage, v in values.items() if v != common]
    return ",".join([word(common), *rest])


def cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cpusets), at most
    MAX_WORKERS."""
    return min(len(os.sched_getaffinity(0)), MAX_WORKERS)


def _target(value: str) -> str | None:
    return None if value else "a gRPC target is required, e.g. policy:50051 or dns:///policy:50051"


def _progress(seconds: float) -> str | None:
    if seconds >= SENDMAIL_READ_TIMEOUT:
        return (
            f"{seconds:g}s is too long: Sendmail gives up on a milter silent for"
            f" {SENDMAIL_READ_TIMEOUT:g}s (T=R:10s)"
        )
    return positive(seconds)


_SECONDS = "SECONDS"
_STAGE_NAMES = ", ".join(STAGES)


@settings_class
class Config:
    """Every setting of one bridge process; docs/configuration.md is their reference."""

    listen: Listen = option(
        parse=_listen,
        show=str,
        metavar="SPEC",
        help="where MTAs connect: inet:HOST:PORT, inet6:[ADDR]:PORT or unix:/PATH (required)",
    )
    upstream: str = option(
        parse=text,
        check=_target,
        metavar="TARGET",
        help="the policy service: host:port, dns:///name:port, ipv4:A:P,A:P or unix:/path,"
        " round_robin over the addresses; 'embedded' runs the bundled demo policy (required)",
    )
    socket_mode: int | None = option(
        default=None,
        parse=octal,
        check=permission_mode,
        show=show_octal,
        metavar="OCTAL",
        help="permissions of a unix listen socket, e.g. 660",
    )
    socket_group: str | None = option(
        default=None,
        parse=text,
        check=existing_group,
        metavar="GROUP",
        help="group of a unix listen socket, e.g. postfix",
    )
    max_connections: int = option(
        default=1000,
        parse=whole,
        check=positive,
        metavar="N",
        help="MTA connections at once, for the whole bridge (all its workers);"
        " more are closed with a log line",
    )
    workers: int = option(
        default=1,
        parse=whole_or_auto(cores),
        check=worker_count,
        metavar="N|auto",
        help="processes serving MTA connections, sharing the listen socket, each with its own"
        " policy channel; auto: one per core this process may run on (at most 64)",
    )
    deadlines: Mapping[Stage, float] = option(
        name="deadline",
        default_factory=default_deadlines,
        parse=_deadlines,
        show=_show_staged,
        repeatable=True,
        metavar="[STAGE=]SECONDS",
        help=f"how long the policy may take to answer; stages: {_STAGE_NAMES}",
    )
    failure_actions: Mapping[Stage, FailureAction] = option(
        name="failure_action",
        default_factory=default_failure_actions,
        parse=_failure_actions,
        show=_show_staged,
        repeatable=True,
        metavar="[STAGE=]ACTION",
        help="the answer when the policy cannot give one: tempfail, reject, accept or continue",
    )
    describe_wait: float = option(
        default=2.0,
        parse=number,
        check=positive,
        metavar=_SECONDS,
        help="how long an MTA's negotiation waits for capabilities not yet fetched",
    )
    describe_refresh: float = option(
        default=30.0,
        parse=number,
        check=positive,
        metavar=_SECONDS,
        help="how often the policy's capabilities are fetched again",
    )
    progress_interval: float = option(
        default=5.0,
        parse=number,
        check=_progress,
        metavar=_SECONDS,
        help="SMFIR_PROGRESS while the policy works on end of message (below Sendmail's 10 s)",
    )
    grace_period: float = option(
        default=30.0,
        parse=number,
        check=seconds_or_zero,
        metavar=_SECONDS,
        help="how long connections may finish after SIGTERM",
    )
    policy_streams: int = option(
        default=4,
        parse=whole,
        check=stream_count,
        metavar="COUNT",
        help=(
            "carry the SMTP sessions on this many long-lived shared streams when the policy"
            " offers them (Capabilities.shared_streams); 0: a Process stream per session."
            " Sessions spread over the replicas these streams reach: with more replicas than"
            " streams, raise it"
        ),
    )
    policy_stream_lifetime: float = option(
        default=30.0,
        parse=number,
        check=positive,
        metavar=_SECONDS,
        help=(
            "a shared stream takes new sessions this long, then a new stream takes its place"
            " (so that sessions spread over replicas added since); the old one ends with its"
            " last session"
        ),
    )
    max_packet_size: int = option(
        default=DEFAULT_MAX_PACKET_SIZE,
        parse=whole,
        check=positive,
        metavar="BYTES",
        help="the largest milter packet accepted from the MTA",
    )
    max_body_buffer: int = option(
        default=DEFAULT_MAX_BODY_BUFFER,
        parse=whole,
        check=positive,
        metavar="BYTES",
        help="most body bytes held for a policy that buffers the body",
    )
    max_header_buffer: int = option(
        default=DEFAULT_MAX_HEADER_BUFFER,
        parse=whole,
        check=positive,
        metavar="BYTES",
        help="most header bytes held for the policy per message",
    )
    max_headers: int = option(
        default=DEFAULT_MAX_HEADERS,
        parse=whole,
        check=positive,
        metavar="COUNT",
        help="most headers held for the policy per message; beyond, headers_truncated",
    )
    max_recipient_buffer: int = option(
        default=DEFAULT_MAX_RECIPIENT_BUFFER,
        parse=whole,
        check=positive,
        metavar="BYTES",
        help="most recipient bytes held for the policy per message; beyond, recipients_truncated",
    )
    max_recipients: int = option(
        default=DEFAULT_MAX_RECIPIENTS,
        parse=whole,
        check=positive,
        metavar="COUNT",
        help="most recipients held for the policy per message; beyond, recipients_truncated",
    )
    mta_idle_timeout: float = option(
        default=7210.0,
        parse=number,
        check=positive,
        metavar=_SECONDS,
        help="close an MTA connection silent for this long (libmilter's default)",
    )
    metrics_listen: str | None = option(
        default=None,
        parse=text,
        check=host_and_port,
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz over HTTP here; off when unset",
    )
    log_format: str = option(
        default="plain",
        parse=one_of(*LOG_FORMATS),
        check=member(LOG_FORMATS),
        metavar="FORMAT",
        help="plain lines, or json: one object per line with conn, qid, stage, verdict, latency_ms",
    )
    log_level: str = option(
        default="info",
        parse=one_of(*LOG_LEVELS),
        check=member(LOG_LEVELS),
        metavar="LEVEL",
        help="debug, info, warning or error",
    )
    upstream_tls: bool = option(
        default=False,
        parse=on_off,
        show=show_on_off,
        metavar="on|off",
        help="TLS to the policy, trusting the system's CAs;"
        " --upstream-ca or --upstream-cert turn it on too",
    )
    upstream_ca: str | None = option(
        default=None,
        parse=text,
        check=pem_file("certificate", PEM_CERTIFICATE),
        metavar="FILE",
        help="PEM CA certificates the policy's certificate must chain to",
    )
    upstream_cert: str | None = option(
        default=None,
        parse=text,
        check=pem_file("certificate", PEM_CERTIFICATE),
        metavar="FILE",
        help="PEM client certificate for mutual TLS (with --upstream-key)",
    )
    upstream_key: str | None = option(
        default=None,
        parse=text,
        check=pem_file("private key", PEM_KEY),
        metavar="FILE",
        help="PEM private key of --upstream-cert",
    )
    upstream_server_name: str | None = option(
        default=None,
        parse=text,
        metavar="NAME",
        help="the name the policy's certificate must carry, when not the target's host",
    )
    upstream_token_file: str | None = option(
        default=None,
        parse=text,
        check=nonempty_file,
        metavar="FILE",
        help="a token sent as 'authorization: Bearer TOKEN' on every call;"
        " read again when it changes",
    )

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of --metrics-listen; port -1 when it is not a number."""
        return None if self.metrics_listen is None else host_port(self.metrics_listen)

    @property
    def tls(self) -> bool:
        return self.upstream_tls or self.upstream_ca is not None or self.upstream_cert is not None

    def __post_init__(self) -> None:
        """Settings that depend on each other first, then each setting's own check."""
        for stage, seconds in self.deadlines.items():
            problem = positive(seconds)
            if problem is not None:
                msg = f"--deadline {stage.value}: {problem}"
                raise ConfigError(msg)
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
        failed = check_all(self)
        if failed is not None:
            setting, problem = failed
            msg = f"{setting.flag}: {problem}"
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
