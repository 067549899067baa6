"""``python -m bench.workers``: the bridge with ``--workers 1`` and ``--workers 2``, same cores.

The bridge (its defaults) and the SDK policy run on ``--milter-cores`` (default
0,1) in both rows, so the rows differ only in the number of workers; the load
tool runs on ``--load-core``. On a machine with two cores the load tool cannot
be kept apart from a bridge that spans both: its CPU time per message and its
share of the cores are in the table, so what it takes from the bridge is seen,
not guessed. Every message's outcome is checked as in ``bench.run``. Prints a
markdown table; ``--out FILE`` also writes it and the raw runs beside it (.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.load import Load
from bench.milters import BRIDGE, Milter, started
from bench.processes import BenchFailure, check_cores
from bench.report import Measurement
from bench.run import every_run, machine, warm_up

WORKERS = (1, 2)
TIMES, DASH = "\N{MULTIPLICATION SIGN}", "\N{EN DASH}"


def _cores(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        msg = f"{text!r} is not a comma-separated list of cores"
        raise argparse.ArgumentTypeError(msg) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    add = p.add_argument
    add("--seconds", type=float, default=8.0, help="length of one run (default 8)")
    add("--runs", type=int, default=3, help="runs per row; the row is their median (default 3)")
    add(
        "--concurrency",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[8, 64],
        metavar="N,N,...",
        help="MTA connections at once, one row each (default 8,64)",
    )
    add("--milter-cores", type=_cores, default=(0, 1), help="bridge and policy (default 0,1)")
    add("--load-core", type=int, default=1, help="the core of the load tool (default 1)")
    add("--out", type=Path, metavar="FILE.md", help="also write the table here, raw JSON beside")
    return p


def milter(workers: int) -> Milter:
    return Milter(
        f"bridge-{workers}w",
        f"bridge --workers {workers} + SDK policy",
        policy_apart=True,
        bridge_flags=("--workers", str(workers)),
    )


def measure(args: argparse.Namespace, directory: Path) -> list[Measurement]:
    out = []
    shape = Load(concurrency=1)
    for workers in WORKERS:
        with started(milter(workers), directory, core=args.milter_cores, marker=shape.marker) as m:
            warm_up(m, args.load_core)
            out += [measurement for measurement, _ in every_run(m, args, args.milter_cores)]
    return out


def table(measurements: list[Measurement], args: argparse.Namespace) -> str:
    cores = len(set(args.milter_cores) | {args.load_core})
    lines = [
        f"Bridge and SDK policy on cores {','.join(map(str, args.milter_cores))}, load tool on"
        f" core {args.load_core}; {args.runs} runs {TIMES} {args.seconds:g} s, medians;"
        f" CPU per message from /proc; shares of the {cores} cores' time.",
        "",
        "| workers | c | msg/s (runs) | vs 1 worker | bridge µs/msg | policy µs/msg"
        " | load tool µs/msg | load tool's share | cores busy | p50 ms | p99 ms | steal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[int, float] = {}
    for workers in WORKERS:
        for c in args.concurrency:
            key = milter(workers).key
            runs = [m for m in measurements if m.milter == key and m.concurrency == c]
            rate = statistics.median(m.messages_per_s for m in runs)
            slowest = min(m.messages_per_s for m in runs)
            fastest = max(m.messages_per_s for m in runs)
            base.setdefault(c, rate)
            bridge = _median(runs, lambda m: m.cpu_us_per_message(BRIDGE.key))
            policy = _median(runs, lambda m: m.cpu_us_per_message("policy"))
            load = _median(runs, lambda m: 1e6 * m.load_cpu_s / m.messages)
            load_share = _median(runs, lambda m: m.load_cpu_s / m.elapsed_s / cores)
            busy = _median(
                runs, lambda m: (sum(m.cpu_s.values()) + m.load_cpu_s) / m.elapsed_s / cores
            )
            lines.append(
                f"| {workers} | {c} | {rate:,.0f} ({slowest:,.0f}{DASH}{fastest:,.0f}) |"
                f" {rate / base[c]:.2f}{TIMES} |"
                f" {bridge:,.0f} | {policy:,.0f} | {load:,.0f} | {load_share:.0%} | {busy:.0%} |"
                f" {_median(runs, lambda m: m.p50_ms):.2f} |"
                f" {_median(runs, lambda m: m.p99_ms):.2f} |"
                f" {max(m.stolen for m in runs):.0%} |"
            )
    return "\n".join(lines) + "\n"


def _median(runs: list[Measurement], figure: Callable[[Measurement], float]) -> float:
    return float(statistics.median(figure(m) for m in runs))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_cores(*args.milter_cores, args.load_core)
        os.sched_setaffinity(0, {args.load_core})
        with tempfile.TemporaryDirectory(prefix="milter-bench-workers-") as tmp:
            measurements = measure(args, Path(tmp))
    except BenchFailure as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    text = table(measurements, args)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        raw = {
            "machine": machine(),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "measurements": [asdict(m) for m in measurements],
        }
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
