"""The benchmark's result: one row per milter and concurrency (medians of its runs), ratios.

Each column is the median of that figure over the runs, taken on its own, so
one row's columns may come from different runs; the slowest and the fastest
run's msg/s and the worst steal time stand beside them, to show how far the
runs disagreed. Ratios compare rows of one benchmark run at the same
concurrency only: absolute figures differ from machine to machine (and from run
to run on a busy virtual machine), ratios less.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.milters import BRIDGE, C_ALL, MILTERS, PYMILTER

# A core this busy is taken as the limit of the row.
SATURATED = 0.9
NOTHING = "\N{EN DASH}"  # in a column that does not apply to the row


@dataclass(frozen=True, slots=True)
class Measurement:
    """One checked run of the load tool against one milter."""

    milter: str
    concurrency: int
    run: int
    messages: int
    elapsed_s: float
    messages_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s: dict[str, float]  # milter side, by process: {"c-all": ...} or {"bridge", "policy"}
    load_cpu_s: float
    steal_s: float  # of the milter core or the load core, whichever lost more
    outcomes: dict[str, int]
    modifications: dict[str, int]

    def cpu_us_per_message(self, process: str | None = None) -> float:
        seconds = sum(self.cpu_s.values()) if process is None else self.cpu_s[process]
        return 1e6 * seconds / self.messages

    @property
    def milter_core_busy(self) -> float:
        return sum(self.cpu_s.values()) / self.elapsed_s

    @property
    def load_core_busy(self) -> float:
        return self.load_cpu_s / self.elapsed_s

    @property
    def stolen(self) -> float:
        return self.steal_s / self.elapsed_s


@dataclass(frozen=True, slots=True)
class Row:
    milter: str
    label: str
    concurrency: int
    runs: int
    messages_per_s: float
    slowest_run: float  # msg/s
    fastest_run: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the milter process, or the bridge process
    policy_cpu_us: float | None  # the policy process behind the bridge
    total_cpu_us: float  # the whole milter side
    milter_core_busy: float
    idle_kib: float  # bytes of RSS per idle MTA connection / 1024, whole milter side
    load_cpu_us: float
    load_core_busy: float
    stolen: float  # the largest share of a run's time the hypervisor took from a core
    limit: str = field(default="")

    @classmethod
    def of(cls, runs: list[Measurement], idle: dict[str, float]) -> Row:
        first = runs[0]
        milter = MILTERS[first.milter]
        main = BRIDGE.key if milter.policy_apart else milter.key  # the bridge's process
        row = cls(
            milter=milter.key,
            label=milter.label,
            concurrency=first.concurrency,
            runs=len(runs),
            messages_per_s=_median(m.messages_per_s for m in runs),
            slowest_run=min(m.messages_per_s for m in runs),
            fastest_run=max(m.messages_per_s for m in runs),
            p50_ms=_median(m.p50_ms for m in runs),
            p99_ms=_median(m.p99_ms for m in runs),
            cpu_us=_median(m.cpu_us_per_message(main) for m in runs),
            policy_cpu_us=_median(m.cpu_us_per_message("policy") for m in runs)
            if milter.policy_apart
            else None,
            total_cpu_us=_median(m.cpu_us_per_message() for m in runs),
            milter_core_busy=_median(m.milter_core_busy for m in runs),
            idle_kib=sum(idle.values()) / 1024,
            load_cpu_us=_median(1e6 * m.load_cpu_s / m.messages for m in runs),
            load_core_busy=_median(m.load_core_busy for m in runs),
            stolen=max(m.stolen for m in runs),
        )
        return _with_limit(row)


def _median(values: Any) -> float:
    return float(statistics.median(list(values)))


def _with_limit(row: Row) -> Row:
    """Which side ran out of CPU; neither: the round trips (concurrency) are the limit."""
    load = row.load_core_busy >= SATURATED
    milter = row.milter_core_busy >= SATURATED
    limit = (
        "both cores"
        if load and milter
        else "load tool's core"
        if load
        else "milter core"
        if milter
        else "neither core (round trips)"
    )
    return Row(**{**asdict(row), "limit": limit})


@dataclass(frozen=True, slots=True)
class Ratio:
    milter: str
    label: str
    concurrency: int
    throughput_vs_pymilter: float
    throughput_vs_c: float
    cpu_vs_pymilter: float
    cpu_vs_c: float


def ratios(rows: list[Row]) -> list[Ratio]:
    """Every row against pymilter and C (every callback) at its concurrency, when both ran."""
    by = {(r.milter, r.concurrency): r for r in rows}
    found = []
    for row in rows:
        py = by.get((PYMILTER.key, row.concurrency))
        c = by.get((C_ALL.key, row.concurrency))
        if py is None or c is None:
            continue
        found.append(
            Ratio(
                row.milter,
                row.label,
                row.concurrency,
                row.messages_per_s / py.messages_per_s,
                row.messages_per_s / c.messages_per_s,
                row.total_cpu_us / py.total_cpu_us,
                row.total_cpu_us / c.total_cpu_us,
            )
        )
    return found


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def markdown(rows: list[Row], settings: dict[str, Any], machine: dict[str, str]) -> str:
    milter_core, load_core = settings["milter_core"], settings["load_core"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']};"
        f" Linux {machine['kernel']}.",
        f"Load: {settings['body_size']} B body, {settings['headers']} headers,"
        f" {settings['recipients']} recipient, one message per connection,"
        f" {settings['marker_share']} of the messages marked ({settings['marker']});"
        f" medians of {settings['runs']} runs of {settings['seconds']} s;"
        f" milter side on core {milter_core}, load tool on core {load_core}; unix sockets.",
        "",
        "| milter | conc | msg/s | runs' msg/s | p50 ms | p99 ms | milter CPU µs/msg"
        f" | policy CPU µs/msg | core {milter_core} busy | idle conn KiB"
        f" | load tool CPU µs/msg | core {load_core} busy | steal | limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r.label} | {r.concurrency} | {_n(r.messages_per_s)}"
        f" | {_n(r.slowest_run)}{NOTHING}{_n(r.fastest_run)} | {_n(r.p50_ms, 1)}"
        f" | {_n(r.p99_ms, 1)} | {_n(r.cpu_us)}"
        f" | {NOTHING if r.policy_cpu_us is None else _n(r.policy_cpu_us)}"
        f" | {r.milter_core_busy:.0%} | {_n(r.idle_kib, 1)} | {_n(r.load_cpu_us)}"
        f" | {r.load_core_busy:.0%} | {r.stolen:.0%} | {r.limit} |"
        for r in rows
    ]
    found = ratios(rows)
    if found:
        lines += [
            "",
            "Ratios at the same concurrency, same run (CPU: the whole milter side,"
            " bridge + policy for the bridge):",
            "",
            "| milter | conc | msg/s ÷ pymilter | msg/s ÷ C | CPU/msg ÷ pymilter | CPU/msg ÷ C |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {q.label} | {q.concurrency} | {q.throughput_vs_pymilter:.2f}"
            f" | {q.throughput_vs_c:.2f} | {q.cpu_vs_pymilter:.2f} | {q.cpu_vs_c:.2f} |"
            for q in found
        ]
    return "\n".join(lines) + "\n"


def raw(
    *,
    measurements: list[Measurement],
    rows: list[Row],
    idle: dict[str, dict[str, float]],
    settings: dict[str, Any],
    machine: dict[str, str],
    loads: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything, for the JSON file: every run with the load tool's whole report."""
    return {
        "machine": machine,
        "settings": settings,
        "idle_bytes_per_connection": idle,
        "rows": [asdict(r) for r in rows],
        "ratios": [asdict(q) for q in ratios(rows)],
        "measurements": [asdict(m) for m in measurements],
        "load_reports": loads,
    }
