"""``python -m bench.profile``: where the bridge and the SDK policy spend their CPU under load.

The bridge setup of the benchmark (bridge and SDK policy on the milter core,
the load tool on the load core), a checked warm-up, then the load for
``--seconds`` plus a margin on each side, while py-spy samples the bridge and
the policy process for ``--seconds``. py-spy runs on the load core: its own
work must not be counted as the milter side's. It pauses a process for each
sample (its default, so that stacks are consistent), which slows the milter
side a little: throughput under profiling is no figure for the table.

Only samples of the thread holding the GIL are taken (py-spy ``--gil``) unless
``--without-gil``: without it py-spy's guess of which threads are idle counts
an event loop waiting in epoll, or grpc's poller thread waiting in native
code, as busy. What the GIL leaves out (grpc's own threads, native code that
released it) is in the thread table instead: each thread's real CPU time over
the window, from /proc/PID/task, next to its samples. Samples can still exceed
CPU time: milter and policy share one core, and a thread that holds the GIL
while it waits for the core is sampled too.

The tables are of the threads that used the CPU: shares of their samples by
area (the package of a frame: grpc's Cython code has no Python frames, so it
shows in the grpc Python frame that called it, or in ``Handle._run`` when the
event loop called it), by innermost function (self) and by function anywhere
on the stack (inclusive; entry points and the event loop's own frames, which
are on every stack, are left out). The raw samples (``--format raw``, one line
per distinct stack, root first, then its count) stay in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import Load, check, run_load
from bench.milters import BRIDGE, Running, started
from bench.processes import BenchFailure, Process, check_cores, pinned, thread_cpu_seconds

PY_SPY = Path(sys.executable).parent / "py-spy"
MARGIN = 3.0  # seconds of load before and after the sampled window
TOP = 15
NOTHING = "\N{EN DASH}"  # an area whose frames are on every stack, so not counted
BUSY_THREAD = 0.1  # share of the process's CPU from which a thread gets its own tables

# Areas by where a frame's file lies; the first match wins. Native frames (--native)
# name a shared object instead of a Python file.
AREAS = (
    ("grpc (grpc.aio, cygrpc)", re.compile(r"grpc/|cygrpc|libgrpc")),
    ("protobuf", re.compile(r"google/protobuf|_message\.|libprotobuf|upb")),
    ("asyncio", re.compile(r"asyncio/|_asyncio|selectors\.py")),
    ("logging", re.compile(r"logging/")),
    ("milter_bridge.protocol", re.compile(r"milter_bridge/protocol/")),
    ("milter_bridge.session", re.compile(r"milter_bridge/session/")),
    ("milter_bridge.upstream", re.compile(r"milter_bridge/upstream/")),
    ("milter_bridge.server", re.compile(r"milter_bridge/server/")),
    ("milter_bridge (other)", re.compile(r"milter_bridge/")),
    ("milter_policy (SDK)", re.compile(r"milter_policy/")),
    ("bench policy", re.compile(r"bench/")),
    ("prometheus_client", re.compile(r"prometheus_client/")),
    ("threading, concurrent", re.compile(r"threading\.py|concurrent/")),
    ("native (libc)", re.compile(r"libc\.so|libpthread|vdso")),
)
# Frames on (nearly) every stack of a thread, which say nothing in an inclusive table:
# the interpreter's and the event loop's, and the programs' entry points.
_EVERYWHERE = re.compile(
    r"\((?:<frozen runpy>|asyncio/|threading\.py|selectors\.py|libc\.so)"
    r"|^\S+ \((?:\S*/)?milter_bridge/(?:cli|__main__)\.py"
    r"|^(?:<module>|main) \((?:\S*/)?bench/sdk_policy\.py"
    r"|^Policy\.serve \((?:\S*/)?milter_policy/policy\.py"
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::.*)?$")


def area(frame: str) -> str:
    for name, pattern in AREAS:
        if pattern.search(frame):
            return name
    return "other"


def function(frame: str) -> str:
    """``name (dir/file.py)``: the frame without its line, the file with one directory."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    short = "/".join(Path(match["file"]).parts[-2:])
    return f"{match['function']} ({short})"


@dataclass
class ThreadSamples:
    samples: int = 0
    areas: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    anywhere: Counter[str] = field(default_factory=Counter)
    areas_anywhere: Counter[str] = field(default_factory=Counter)

    def add(self, frames: list[str], count: int) -> None:
        self.samples += count
        self.areas[area(frames[-1])] += count
        self.own[function(frames[-1])] += count
        # Once per sample, however often a function recurses in it.
        for name in {function(f) for f in frames if not _EVERYWHERE.search(f)}:
            self.anywhere[name] += count
        for name in {area(f) for f in frames if not _EVERYWHERE.search(f)}:
            self.areas_anywhere[name] += count


def parse(raw: str) -> dict[int, ThreadSamples]:
    """py-spy's raw output with --threads, by thread id."""
    threads: dict[int, ThreadSamples] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = _THREAD.match(frames[0])
        if thread is None or len(frames) < 2:
            continue
        threads.setdefault(int(thread["tid"]), ThreadSamples()).add(frames[1:], int(count))
    return threads


def _share(n: float, total: float) -> str:
    return f"{n / total:.1%}" if total else "-"


def summary(
    title: str,
    raw: str,
    cpu: dict[int, tuple[str, float]],
    rate: int,
) -> str:
    """Markdown: each thread's CPU and samples, then the tables of the busy threads."""
    threads = parse(raw)
    total_cpu = sum(seconds for _, seconds in cpu.values())
    lines = [
        f"### {title}: {total_cpu:.2f} s CPU in the window",
        "",
        "| thread | CPU s (/proc) | share of the process | py-spy samples (÷ rate = s) |",
        "|---|---:|---:|---:|",
    ]
    busy = []
    for tid, (name, seconds) in sorted(cpu.items(), key=lambda kv: -kv[1][1]):
        samples = threads.get(tid, ThreadSamples()).samples
        if seconds == 0 and samples == 0:
            continue
        lines.append(
            f"| {tid} {name} | {seconds:.2f} | {_share(seconds, total_cpu)}"
            f" | {samples} ({samples / rate:.2f}) |"
        )
        if total_cpu and seconds / total_cpu >= BUSY_THREAD and samples:
            busy.append((tid, name))
    for tid, name in busy:
        t = threads[tid]
        lines += ["", f"Thread {tid} ({name}), {t.samples} samples:", ""]
        lines += ["| area | self (innermost frame) | anywhere on the stack |", "|---|---:|---:|"]
        for a, n in [
            *t.areas.most_common(),
            *((a, 0) for a in t.areas_anywhere if a not in t.areas),
        ]:
            anywhere = t.areas_anywhere[a]
            on_stack = _share(anywhere, t.samples) if anywhere else NOTHING
            lines.append(f"| {a} | {_share(n, t.samples)} | {on_stack} |")
        lines += ["", "| function (innermost frame) | self |", "|---|---:|"]
        lines += [f"| `{f}` | {_share(n, t.samples)} |" for f, n in t.own.most_common(TOP)]
        lines += ["", "| function anywhere on the stack | inclusive |", "|---|---:|"]
        lines += [f"| `{f}` | {_share(n, t.samples)} |" for f, n in t.anywhere.most_common(TOP)]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--seconds", type=float, default=20.0, help="sampled window (default 20)")
    add("--concurrency", type=int, default=64, help="MTA connections at once (default 64)")
    add("--rate", type=int, default=100, help="samples per second (default 100)")
    add("--native", action="store_true", help="also native frames (grpc's C core, libc)")
    add(
        "--without-gil",
        action="store_true",
        help="also samples of threads not holding the GIL (py-spy may count waits as busy)",
    )
    add("--milter-core", type=int, default=0)
    add("--load-core", type=int, default=1)
    out = Path(tempfile.gettempdir()) / "milter-bridge-profile"
    add("--out", type=Path, default=out, metavar="DIR", help=f"(default {out})")
    return p


def profile(args: argparse.Namespace) -> str:
    if not PY_SPY.is_file():
        msg = f"no py-spy at {PY_SPY}: pip install -e '.[dev]' into this venv installs it"
        raise BenchFailure(msg)
    check_cores(args.milter_core, args.load_core)
    args.out.mkdir(parents=True, exist_ok=True)
    load = Load(concurrency=args.concurrency, seconds=args.seconds + 2 * MARGIN)
    with (
        tempfile.TemporaryDirectory(prefix="milter-profile-") as tmp,
        started(BRIDGE, Path(tmp), core=args.milter_core, marker=load.marker) as m,
    ):
        warm = Load(concurrency=8, count=100)
        check(run_load(m.target, warm, core=args.load_core), warm.marker_share, "warm-up")
        report, cpu = _profile_under_load(m, load, args)
    check(report, load.marker_share, f"bridge c={args.concurrency} under py-spy")
    parts = [
        f"bridge + SDK policy under `milter-bridge load` at concurrency {args.concurrency}:"
        f" {report['messages_per_s']:,.0f} msg/s while sampled at {args.rate} Hz"
        f"{' with native frames' if args.native else ''}"
        f"{'' if args.without_gil else ', samples of the thread holding the GIL'},"
        f" {args.seconds:g} s window.",
        "",
    ]
    for name, threads in cpu.items():
        raw = (args.out / f"{name}.raw.txt").read_text()
        parts.append(summary(name, raw, threads, args.rate))
    text = "\n".join(parts)
    (args.out / "summary.md").write_text(text)
    return text


def _cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[int, tuple[str, float]]:
    return {
        tid: (name, seconds - before.get(tid, (name, 0.0))[1])
        for tid, (name, seconds) in after.items()
    }


def _spy(p: Process, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    argv = [
        *(str(PY_SPY), "record", "--threads", "--pid", str(p.pid)),
        *("--duration", str(round(args.seconds)), "--rate", str(args.rate)),
        *("--format", "raw", "--output", str(args.out / f"{p.name}.raw.txt")),
        *(["--native"] if args.native else []),
        *([] if args.without_gil else ["--gil"]),
    ]
    return subprocess.Popen(  # noqa: S603 - argv built here
        pinned(args.load_core, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _profile_under_load(
    m: Running, load: Load, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, dict[int, tuple[str, float]]]]:
    """The load tool's report, and each process's CPU by thread over the sampled window."""
    loader = subprocess.Popen(  # noqa: S603 - argv built by the benchmark
        pinned(args.load_core, load.argv(m.target)), stdout=subprocess.PIPE, text=True
    )
    time.sleep(MARGIN)
    before = {p.name: thread_cpu_seconds(p.pid) for p in m.processes}
    spies = [_spy(p, args) for p in m.processes]
    for spy in spies:
        _, err = spy.communicate(timeout=args.seconds + 60)
        if spy.returncode != 0:
            msg = f"py-spy failed (exit {spy.returncode}): {err.decode(errors='replace')}"
            raise BenchFailure(msg)
    cpu = {p.name: _cpu_delta(before[p.name], thread_cpu_seconds(p.pid)) for p in m.processes}
    out, _ = loader.communicate(timeout=args.seconds + 120)
    report: dict[str, Any] = json.loads(out)
    return report, cpu


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        text = profile(args)
    except BenchFailure as exc:
        print(f"bench.profile: FAILED: {exc}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
