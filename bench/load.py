"""One run of ``milter-bridge load`` against a milter, and the check of its every outcome.

The load tool runs as its own process, pinned to the load core, exactly as a
user runs it (``--json``); its report carries its own CPU time. Its marker is
deterministic (message k is marked when floor((k+1)·share) > floor(k·share)),
so N messages hold exactly floor(N·share) marked ones, and the outcome of
every message is known before the run: a milter that answers fast but wrong
fails the benchmark instead of making a row.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from bench.processes import BenchFailure, pinned

CONTINUED = "eom continue"
REJECTED = "eom reject 550"


@dataclass(frozen=True, slots=True)
class Load:
    """The message shape and the amount of one run."""

    concurrency: int
    seconds: float | None = None
    count: int | None = None
    marker: str = "REJECT"
    marker_share: Fraction = Fraction(1, 10)
    headers: int = 10
    body_size: int = 10240
    recipients: int = 1

    def argv(self, target: str) -> list[str]:
        amount = (
            ["--count", str(self.count)]
            if self.count is not None
            else ["--duration", str(self.seconds)]
        )
        return [
            *(sys.executable, "-m", "milter_bridge", "load", target, "--json", "--quiet"),
            *amount,
            *("--concurrency", str(self.concurrency), "--messages-per-connection", "1"),
            *("--headers", str(self.headers), "--body-size", str(self.body_size)),
            *("--recipients", str(self.recipients), "--marker", self.marker),
            *("--marker-share", str(self.marker_share)),
        ]


def run_load(target: str, load: Load, *, core: int) -> dict[str, Any]:
    """The load tool's JSON report; raises BenchFailure when it gave none."""
    limit = 120.0 + (load.seconds or 0.0)
    try:
        result = subprocess.run(  # noqa: S603 - argv built here
            pinned(core, load.argv(target)),
            capture_output=True,
            text=True,
            check=False,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:
        msg = f"the load tool did not finish within {limit:g} s"
        raise BenchFailure(msg) from None
    # Exit status 1 means protocol errors, which check() reports from the JSON.
    if result.returncode not in (0, 1) or not result.stdout.strip():
        msg = f"the load tool failed (exit {result.returncode}):\n{result.stderr}"
        raise BenchFailure(msg)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def expected(messages: int, share: Fraction) -> tuple[dict[str, int], dict[str, int]]:
    """The outcomes and modifications ``messages`` messages must have had."""
    rejected = math.floor(messages * share)
    outcomes = {CONTINUED: messages - rejected, REJECTED: rejected}
    modifications = {"add_header": messages - rejected}
    return (
        {k: n for k, n in outcomes.items() if n},
        {k: n for k, n in modifications.items() if n},
    )


def problems(report: dict[str, Any], share: Fraction) -> list[str]:
    """What is wrong with a run: empty when every message got the answer it must."""
    found = []
    messages = int(report["messages"])
    outcomes, modifications = expected(messages, share)
    if messages == 0:
        found.append("no message was sent")
    if report["outcomes"] != outcomes:
        found.append(f"outcomes {report['outcomes']}, expected {outcomes}")
    if report["modifications"] != modifications:
        found.append(f"modifications {report['modifications']}, expected {modifications}")
    errors = report["protocol_errors"]
    if errors["total"]:
        found.append(f"{errors['total']} protocol errors {errors['by_kind']}: {errors['first']}")
    if report["connection_failures"]:
        found.append(f"connections failed: {report['connection_failures']}")
    if report["latency"]["messages"] != messages:
        found.append(f"{messages - report['latency']['messages']} messages without a latency")
    return found


def check(report: dict[str, Any], share: Fraction, what: str) -> None:
    if found := problems(report, share):
        msg = f"{what}: wrong answers, the run does not count:\n  " + "\n  ".join(found)
        raise BenchFailure(msg)
