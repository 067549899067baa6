"""``python -m bench.run``: the bridge against libmilter C and pymilter, in one run.

For each milter (libmilter C with every callback, libmilter C with header and
end-of-message callbacks only, pymilter with every callback, the bridge in
front of the SDK policy), started fresh on the milter core: a checked warm-up,
the memory of idle MTA connections, then for each concurrency ``--runs`` runs of
the load tool on the load core, each one checked message by message. Prints
the markdown table; ``--out FILE`` also writes it, and FILE with a .json suffix
the raw results. Exit status 1 when a milter answered wrongly or something
could not run (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.idle import memory_per_connection
from bench.install import ensure_prerequisites
from bench.load import Load, check, run_load
from bench.milters import MILTERS, Binaries, Milter, Running, build, started
from bench.processes import BenchFailure, Cores, check_cores, listed, steal_seconds
from bench.report import Measurement, Row, markdown, raw

WARM_UP_MESSAGES = 100


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        msg = f"{text!r} is not a comma-separated list of numbers"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) < 1:
        msg = "every concurrency must be at least 1"
        raise argparse.ArgumentTypeError(msg)
    return values


def _milters(text: str) -> list[Milter]:
    unknown = [k for k in text.split(",") if k not in MILTERS]
    if unknown:
        msg = f"unknown milter(s) {unknown}; known: {', '.join(MILTERS)}"
        raise argparse.ArgumentTypeError(msg)
    return [MILTERS[k] for k in text.split(",")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--seconds", type=float, default=10.0, help="length of one run (default 10)")
    add("--runs", type=int, default=3, help="runs per row; the row is their median (default 3)")
    add(
        "--concurrency",
        type=_concurrencies,
        default=[1, 8, 64],
        metavar="N,N,...",
        help="MTA connections at once, one row each (default 1,8,64)",
    )
    add(
        "--milters",
        type=_milters,
        default=list(MILTERS.values()),
        metavar="KEY,...",
        help=f"which milters (default all: {','.join(MILTERS)})",
    )
    add("--idle-connections", type=int, default=200, help="for memory per idle connection")
    add("--milter-core", type=int, default=0, help="the core of the milter side (default 0)")
    add("--load-core", type=int, default=1, help="the core of the load tool (default 1)")
    add("--out", type=Path, metavar="FILE.md", help="also write the table here, raw JSON beside")
    add(
        "--no-install",
        action="store_true",
        help="install nothing (apt, pip): fail when something is missing",
    )
    return p


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_milter(
    milter: Milter,
    binaries: Binaries,
    directory: Path,
    args: argparse.Namespace,
    loads: list[dict[str, Any]],
) -> tuple[list[Measurement], dict[str, float]]:
    """Every run of one milter, and its memory per idle connection by process."""
    shape = Load(concurrency=1)
    measurements: list[Measurement] = []
    with started(
        milter, directory, core=args.milter_core, marker=shape.marker, binaries=binaries
    ) as m:
        warm_up(m, args.load_core)
        idle = memory_per_connection(str(m.socket), m.processes, args.idle_connections)
        _say(f"{milter.key}: {sum(idle.values()) / 1024:.1f} KiB per idle connection")
        for measurement, report in every_run(m, args, args.milter_core):
            loads.append(report)
            measurements.append(measurement)
    return measurements, idle


def every_run(
    m: Running, args: argparse.Namespace, milter_core: Cores
) -> Iterator[tuple[Measurement, dict[str, Any]]]:
    """``args.runs`` checked runs of ``args.seconds`` at each of ``args.concurrency``,
    each said on stderr as it ends."""
    for concurrency in args.concurrency:
        for run in range(1, args.runs + 1):
            load = Load(concurrency=concurrency, seconds=args.seconds)
            measurement, report = measure_run(
                m, load, run, milter_core=milter_core, load_core=args.load_core
            )
            _say(
                f"{m.milter.key} c={concurrency} run {run}/{args.runs}:"
                f" {measurement.messages_per_s:,.0f} msg/s,"
                f" {measurement.cpu_us_per_message():,.0f} µs CPU/msg"
            )
            yield measurement, report


def warm_up(m: Running, load_core: int) -> None:
    """Connections, threads and lazy imports set up once, and a first check that the
    milter answers right, before anything is measured."""
    warm = Load(concurrency=8, count=WARM_UP_MESSAGES)
    check(run_load(m.target, warm, core=load_core), warm.marker_share, "warm-up")


def measure_run(
    m: Running, load: Load, run: int, *, milter_core: Cores, load_core: int
) -> tuple[Measurement, dict[str, Any]]:
    cores = (*listed(milter_core), load_core)
    stolen = [steal_seconds(core) for core in cores]
    before = {p.name: p.cpu_seconds() for p in m.processes}
    report = run_load(m.target, load, core=load_core)
    after = {p.name: p.cpu_seconds() for p in m.processes}
    stolen = [steal_seconds(core) - s for core, s in zip(cores, stolen, strict=True)]
    for p in m.processes:
        p.check_alive()
    check(report, load.marker_share, f"{m.milter.key} c={load.concurrency} run {run}")
    latency = report["latency"]
    measurement = Measurement(
        milter=m.milter.key,
        concurrency=load.concurrency,
        run=run,
        messages=report["messages"],
        elapsed_s=report["elapsed_s"],
        messages_per_s=report["messages_per_s"],
        p50_ms=latency["p50_ms"],
        p99_ms=latency["p99_ms"],
        cpu_s={name: after[name] - before[name] for name in before},
        load_cpu_s=report["cpu_s"],
        steal_s=max(stolen),
        outcomes=report["outcomes"],
        modifications=report["modifications"],
    )
    return measurement, {"milter": m.milter.key, "run": run, **report}


def benchmark(args: argparse.Namespace) -> str:
    check_cores(args.milter_core, args.load_core)
    # This process only waits for the load tool, but its own work (connections for the
    # memory measurement, reading /proc) must not land on the milter core.
    os.sched_setaffinity(0, {args.load_core})
    ensure_prerequisites(install=not args.no_install)
    shape = Load(concurrency=1)
    settings = {
        "seconds": args.seconds,
        "runs": args.runs,
        "concurrency": args.concurrency,
        "idle_connections": args.idle_connections,
        "milter_core": args.milter_core,
        "load_core": args.load_core,
        "body_size": shape.body_size,
        "headers": shape.headers,
        "recipients": shape.recipients,
        "marker": shape.marker,
        "marker_share": str(shape.marker_share),
        "transport": "unix sockets (MTA side and the bridge's policy)",
    }
    measurements: list[Measurement] = []
    idle: dict[str, dict[str, float]] = {}
    loads: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="milter-bench-") as tmp:
        directory = Path(tmp)
        binaries = build(directory)
        for milter in args.milters:
            found, idle[milter.key] = measure_milter(milter, binaries, directory, args, loads)
            measurements += found
    rows = [
        Row.of(
            [m for m in measurements if m.milter == milter.key and m.concurrency == c],
            idle[milter.key],
        )
        for milter in args.milters
        for c in args.concurrency
    ]
    table = markdown(rows, settings, machine())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        results = raw(
            measurements=measurements,
            rows=rows,
            idle=idle,
            settings=settings,
            machine=machine(),
            loads=loads,
        )
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or args.idle_connections < 1:
        parser().error("--runs, --seconds and --idle-connections must be positive")
    try:
        table = benchmark(args)
    except BenchFailure as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
