"""What a fault case saw, as one row of the matrix in docs/reliability.md.

A case measures the bridge before the fault (``Probe.take``) and after it,
collects the load's reports and builds a ``Row``. With ``FAULTS_RECORD=FILE``
every row is appended to FILE as one JSON line; ``python -m tests.faults.record
FILE`` prints them as the markdown table. ``FAULTS_SCALE=N`` multiplies the
cases' message counts (the long run; CI runs with 1).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from milter_bridge.load import Report
from tests.runtime.process import BridgeProcess

FAILURE_LINE = " policy failure at "  # one WARNING per failure action (and the cause)
SHUTDOWN_LINE = " shutting down: answering "  # the failure action after the grace period
# "RSS back near the baseline": allocator arenas and caches the load warmed stay.
RSS_SLACK_KB = 16 * 1024


def scale(count: int) -> int:
    """A case's message count for this run: CI's, or ``FAULTS_SCALE`` times it."""
    return count * int(os.environ.get("FAULTS_SCALE", "1"))


def scaled_timeout(seconds: float) -> float:
    """pytest-timeout's limit for a case whose run time grows with ``FAULTS_SCALE``."""
    return seconds * int(os.environ.get("FAULTS_SCALE", "1"))


@dataclass(frozen=True, slots=True)
class Probe:
    """The bridge at one moment: descriptors, resident memory, failure actions logged."""

    fds: int
    rss_kb: int
    failures: int

    @classmethod
    def take(cls, bridge: BridgeProcess) -> Probe:
        return cls(bridge.open_fds(), bridge.status_kb("VmRSS"), _failure_actions(bridge))

    @classmethod
    def gone(cls, bridge: BridgeProcess) -> Probe:
        """After the bridge exited: only its log is left (-1: not measured)."""
        return cls(-1, -1, _failure_actions(bridge))


def _failure_actions(bridge: BridgeProcess) -> int:
    log = bridge.log()
    return log.count(FAILURE_LINE) + log.count(SHUTDOWN_LINE)


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    messages: int
    verdicts: dict[str, int]  # the load's outcomes, summed over the case's reports
    refused_recipients: dict[str, int]
    failure_actions: int  # from the bridge's log: one line per failure action
    unanswered: int  # protocol errors (no answer, closed while waiting, malformed)
    worst_answer_ms: float
    worst_answer_stage: str
    deadline_s: float
    fds: tuple[int, int]
    rss_kb: tuple[int, int]
    path: str = ""  # the policy path the case ran on (conftest.POLICY_PATHS)

    @classmethod
    def build(
        cls,
        case: str,
        reports: list[Report],
        before: Probe,
        after: Probe,
        deadline: float,
    ) -> Row:
        verdicts: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for report in reports:
            verdicts.update(report.outcomes)
            refused.update(report.refused_recipients)
        worst = max(reports, key=lambda r: r.latency.worst_answer_ms)
        return cls(
            case=case,
            messages=sum(r.messages for r in reports),
            verdicts=dict(verdicts),
            refused_recipients=dict(refused),
            failure_actions=after.failures - before.failures,
            unanswered=sum(r.protocol_errors.total for r in reports),
            worst_answer_ms=worst.latency.worst_answer_ms,
            worst_answer_stage=worst.latency.worst_answer_stage,
            deadline_s=deadline,
            fds=(before.fds, after.fds),
            rss_kb=(before.rss_kb, after.rss_kb),
            path=os.environ.get("FAULTS_PATH", ""),
        )

    def save(self) -> Row:
        """Append to ``FAULTS_RECORD`` when it is set."""
        path = os.environ.get("FAULTS_RECORD")
        if path:
            with Path(path).open("a") as out:
                out.write(json.dumps(asdict(self)) + "\n")
        return self

    def assert_settled(self) -> None:
        """The bridge's descriptors back at the baseline (+1), its memory back near it."""
        (fds_before, fds_after), (rss_before, rss_after) = self.fds, self.rss_kb
        assert fds_after <= fds_before + 1, self.fds
        assert rss_after <= rss_before + RSS_SLACK_KB, self.rss_kb


def markdown(rows: list[Row]) -> str:
    lines = [
        "| case | path | messages | verdicts | failure actions | unanswered"
        " | worst answer (stage) vs deadline | RSS MB before → after | fds before → after |",
        "|---|---|---:|---|---:|---:|---|---|---|",
    ]
    for row in rows:
        verdicts = ", ".join(f"{k}: {v}" for k, v in sorted(row.verdicts.items()))
        if row.refused_recipients:
            refused = ", ".join(f"{k}: {v}" for k, v in sorted(row.refused_recipients.items()))
            verdicts += f"; recipients refused {refused}"
        lines.append(
            f"| {row.case} | {row.path} | {row.messages} | {verdicts} | {row.failure_actions}"
            f" | {row.unanswered}"
            f" | {row.worst_answer_ms / 1000:.2f} s ({row.worst_answer_stage})"
            f" vs {row.deadline_s:g} s"
            f" | {_before_after(row.rss_kb, 1024)} | {_before_after(row.fds, 1)} |"
        )
    return "\n".join(lines)


def _before_after(pair: tuple[int, int], unit: int) -> str:
    before, after = (round(n / unit) for n in pair)
    return f"{before} → exited" if pair[1] < 0 else f"{before} → {after}"


def main(path: str) -> None:
    rows = []
    for line in Path(path).read_text().splitlines():
        data = json.loads(line)
        data["fds"], data["rss_kb"] = tuple(data["fds"]), tuple(data["rss_kb"])
        rows.append(Row(**data))
    print(markdown(rows))


if __name__ == "__main__":
    main(sys.argv[1])
