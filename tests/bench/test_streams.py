"""bench/streams.py with tiny settings: each way carries every conversation (its replies
are checked against what was sent) and the table has a row for each. No time asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_way_carries_its_conversations() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.streams",
            "--sessions",
            "300",
            "--concurrency",
            "8",
            "--runs",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| per-session stream",
        "| pooled streams",
        "| multiplexed, batched",
    ]
