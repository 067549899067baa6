"""The result of a load run: built once from the counters, shown as text or as one JSON object."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from milter_bridge.load.stats import CONNECTION_FAILED, Stats, percentile
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag

LATENCY_MEASURES = (
    "per message, from writing MAIL FROM to the answer that decided the message"
    " (normally the end-of-message answer); messages that failed are not included"
)
WORST_ANSWER_MEASURES = (
    "one awaited answer, from writing its event to the final reply; every answer counts,"
    " OPTNEG, CONNECT and HELO too, and those of messages that failed or were abandoned"
)


@dataclass(frozen=True, slots=True)
class Latency:
    messages: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    measures: str = LATENCY_MEASURES
    worst_answer_ms: float = 0.0  # the slowest single answer of the run
    worst_answer_stage: str = ""  # where it was ("optneg" ... "eom"); "" when none was awaited


@dataclass(frozen=True, slots=True)
class Negotiated:
    version: int
    actions: str
    protocol: str
    macros: dict[str, str]
    connections: int


@dataclass(frozen=True, slots=True)
class ProtocolErrors:
    total: int
    by_kind: dict[str, int]
    first: list[dict[str, object]]


@dataclass(frozen=True, slots=True)
class Report:
    config: dict[str, object]
    messages: int
    connections: int
    elapsed_s: float
    messages_per_s: float
    latency: Latency
    outcomes: dict[str, int]
    refused_recipients: dict[str, int]
    modifications: dict[str, int]
    progress: int
    negotiated: list[Negotiated]
    protocol_errors: ProtocolErrors
    connection_failures: list[str]
    cpu_s: float
    cpu_us_per_message: float

    @property
    def ok(self) -> bool:
        """No protocol error and every connection could be made (exit status 0).

        Abandoned messages (LoadConfig.abandon_share) are neither: the MTA chose to leave."""
        return self.protocol_errors.total == 0 and not self.outcomes.get(CONNECTION_FAILED)

    @classmethod
    def build(cls, config: dict[str, object], stats: Stats, elapsed: float, cpu: float) -> Report:
        ordered = sorted(stats.latencies)
        p50, p90, p99, top = (round(1000 * percentile(ordered, f), 3) for f in (0.5, 0.9, 0.99, 1))
        worst = round(1000 * stats.worst_answer, 3)
        latency = Latency(
            len(ordered),
            p50,
            p90,
            p99,
            top,
            worst_answer_ms=worst,
            worst_answer_stage=stats.worst_answer_stage,
        )
        negotiated = [
            Negotiated(
                reply.version,
                f"0x{int(reply.actions):X}",
                f"0x{int(reply.protocol):X}",
                {
                    stage.name.removeprefix("SMFIM_").lower(): n.decode()
                    for stage, n in reply.macros
                },
                connections,
            )
            for reply, connections in stats.negotiations.most_common()
        ]
        errors = ProtocolErrors(
            stats.error_count,
            {kind.value: n for kind, n in stats.errors.most_common()},
            [
                {
                    "kind": e.kind.value,
                    "connection": e.connection,
                    "message": e.message,
                    "stage": e.stage,
                    "text": e.text,
                }
                for e in stats.first_errors
            ],
        )
        return cls(
            config=config,
            messages=stats.messages,
            connections=stats.connections,
            elapsed_s=round(elapsed, 3),
            messages_per_s=round(stats.messages / elapsed, 1) if elapsed > 0 else 0.0,
            latency=latency,
            outcomes=dict(stats.outcomes.most_common()),
            refused_recipients=dict(stats.refused_recipients.most_common()),
            modifications=dict(stats.modifications.most_common()),
            progress=stats.progress,
            negotiated=negotiated,
            protocol_errors=errors,
            connection_failures=list(stats.connect_failures),
            cpu_s=round(cpu, 3),
            cpu_us_per_message=round(1e6 * cpu / stats.messages, 1) if stats.messages else 0.0,
        )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)

    def text(self) -> str:
        c = self.config
        lat = self.latency
        lines = [
            f"milter-bridge load {c['target']}: {self.messages} messages on"
            f" {self.connections} connections in {self.elapsed_s:.2f} s"
            f" (concurrency {c['concurrency']}, {c['messages_per_connection']} per connection)",
            f"  throughput       {self.messages_per_s:.1f} msg/s",
            f"  latency          p50 {lat.p50_ms:.2f} ms  p90 {lat.p90_ms:.2f} ms"
            f"  p99 {lat.p99_ms:.2f} ms  max {lat.max_ms:.2f} ms ({lat.messages} messages)",
            f"                   {lat.measures}",
            f"  worst answer     {lat.worst_answer_ms:.2f} ms at {lat.worst_answer_stage}"
            if lat.worst_answer_stage
            else "  worst answer     - (no answer was awaited)",
            f"                   {WORST_ANSWER_MEASURES}",
            f"  outcomes         {_counts(self.outcomes)}",
            f"  refused rcpts    {_counts(self.refused_recipients)}",
            f"  modifications    {_counts(self.modifications)}; progress {self.progress}",
        ]
        for n in self.negotiated:
            macros = "; ".join(f"{stage}: {names}" for stage, names in n.macros.items())
            lines.append(
                f"  negotiated       version {n.version}, actions {n.actions}"
                f" ({_names(ActionFlag(int(n.actions, 16)))}), protocol {n.protocol}"
                f" ({_names(ProtocolFlag(int(n.protocol, 16)))})"
                f"{', macros ' + macros if macros else ''} ({n.connections} connections)"
            )
        errors = self.protocol_errors
        lines.append(
            f"  protocol errors  {errors.total}"
            + (f" ({_counts(errors.by_kind)})" if errors.total else "")
        )
        lines += [
            f"    {e['kind']}: connection {e['connection']}, message {e['message']},"
            f" at {e['stage']}: {e['text']}"
            for e in errors.first
        ]
        lines += [f"    connection failed: {text}" for text in self.connection_failures]
        lines.append(
            f"  load tool CPU    {self.cpu_us_per_message:.0f} µs/message ({self.cpu_s:.2f} s)"
        )
        return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts.items()) or "-"


def _names(flags: ActionFlag | ProtocolFlag) -> str:
    names = [f.name.removeprefix("SMFIF_").removeprefix("SMFIP_") for f in flags if f.name]
    return "|".join(names) or "none"
