"""The benchmark (bench/) end to end with tiny settings: every row made, every outcome checked.

No time is asserted: a smoke test on a shared CI machine says nothing about speed.
It needs gcc and libmilter-dev (the C milters) and pymilter, which ./test
installs (as root: the Debian packages, then pyproject.toml's ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from bench.load import CONTINUED, REJECTED, expected, problems
from bench.milters import MILTERS
from tests.load.test_libmilter import require_libmilter
from tests.prerequisites import require

ROOT = Path(__file__).resolve().parent.parent.parent
SHARE = Fraction(1, 10)


def require_pymilter() -> None:
    if importlib.util.find_spec("Milter") is not None:
        return
    reason = "pymilter not installed (./test installs the bench extra where libmilter-dev is)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing prerequisite in CI: {reason}")
    pytest.skip(reason)


def _report(messages: int, outcomes: dict[str, int], **changes: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "messages": messages,
        "outcomes": outcomes,
        "modifications": {"add_header": outcomes.get(CONTINUED, 0)},
        "protocol_errors": {"total": 0, "by_kind": {}, "first": []},
        "connection_failures": [],
        "latency": {"messages": messages},
    }
    return report | changes


def test_the_expected_outcomes_follow_the_load_tools_marker() -> None:
    assert expected(100, SHARE) == ({CONTINUED: 90, REJECTED: 10}, {"add_header": 90})
    assert expected(9, SHARE) == ({CONTINUED: 9}, {"add_header": 9})
    assert problems(_report(105, {CONTINUED: 95, REJECTED: 10}), SHARE) == []


@pytest.mark.parametrize(
    "report",
    [
        _report(100, {CONTINUED: 91, REJECTED: 9}),  # a marked message let through
        _report(100, {CONTINUED: 100}),  # never rejects
        _report(100, {"eom accept": 90, REJECTED: 10}),  # another verdict than the policy's
        _report(100, {CONTINUED: 90, REJECTED: 10}, modifications={}),  # no header added
        _report(
            100,
            {CONTINUED: 90, REJECTED: 10},
            protocol_errors={"total": 1, "by_kind": {"unexpected": 1}, "first": []},
        ),
        _report(0, {}),
    ],
)
def test_a_milter_that_answers_wrong_fails_the_run(report: dict[str, Any]) -> None:
    assert problems(report, SHARE)


def test_the_benchmark_makes_every_row_with_checked_outcomes(tmp_path: Path) -> None:
    require_libmilter()
    require(commands=("taskset",))
    require_pymilter()
    cores = sorted(os.sched_getaffinity(0))
    out = tmp_path / "bench.md"
    argv = [
        *(sys.executable, "-m", "bench.run", "--no-install", "--out", str(out)),
        *("--seconds", "1", "--runs", "1", "--concurrency", "1,8", "--idle-connections", "20"),
        # Two cores where there are two; one shared core still runs every row.
        *("--milter-core", str(cores[0]), "--load-core", str(cores[-1])),
    ]
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, check=False, timeout=110
    )
    assert result.returncode == 0, result.stderr

    raw = json.loads(out.with_suffix(".json").read_text())
    every = {(key, c) for key in MILTERS for c in (1, 8)}
    assert {(r["milter"], r["concurrency"]) for r in raw["rows"]} == every
    assert len(raw["ratios"]) == len(every)
    for m in raw["measurements"]:
        assert (m["outcomes"], m["modifications"]) == expected(m["messages"], SHARE), m
        assert m["messages"] > 0
    for report in raw["load_reports"]:
        assert problems(report, SHARE) == [], report["milter"]
    bridge = [r for r in raw["rows"] if r["milter"] == "bridge"]
    assert all(r["policy_cpu_us"] > 0 for r in bridge), bridge
    assert set(raw["idle_bytes_per_connection"]["bridge"]) == {"bridge", "policy"}
    table = out.read_text()
    assert result.stdout == table
    for milter in MILTERS.values():
        assert table.count(f"| {milter.label} |") == 4  # two rows and two ratio rows


def test_the_workers_benchmark_checks_both_rows(tmp_path: Path) -> None:
    """``bench.workers``: --workers 1 and 2 on the same cores, every outcome checked."""
    require(commands=("taskset",))
    cores = sorted(os.sched_getaffinity(0))
    out = tmp_path / "workers.md"
    argv = [
        *(sys.executable, "-m", "bench.workers", "--out", str(out)),
        *("--seconds", "1", "--runs", "1", "--concurrency", "8"),
        *("--milter-cores", ",".join(map(str, cores[:2])), "--load-core", str(cores[-1])),
    ]
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, check=False, timeout=110
    )
    assert result.returncode == 0, result.stderr
    raw = json.loads(out.with_suffix(".json").read_text())
    assert {m["milter"] for m in raw["measurements"]} == {"bridge-1w", "bridge-2w"}
    for m in raw["measurements"]:
        assert (m["outcomes"], m["modifications"]) == expected(m["messages"], SHARE), m
        assert m["messages"] > 0
        assert m["cpu_s"]["bridge"] > 0
        assert m["cpu_s"]["policy"] > 0
    table = out.read_text()
    assert result.stdout == table
    assert "| 1 | 8 |" in table
    assert "| 2 | 8 |" in table
