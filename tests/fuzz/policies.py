"""The policies the black-box fuzzer runs against, beside tests/faults/fleet.py's.

fleet.py's world has the SDK policy of the benchmark, which decides at end of
message only; here the same world with fuzz/every_stage_policy.py, which
decides at every stage, so that the bridge waits for the policy at each of
them while fuzzed sessions arrive.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from milter_bridge.load import Report
from tests.faults.fleet import PolicyProcess, answered_by_the_policy, fleet
from tests.runtime.process import BridgeProcess


class EveryStagePolicy(PolicyProcess):
    """``python -m fuzz.every_stage_policy unix:PATH``: continues, or rejects a marked
    Subject at its header (where fleet.py's policy rejects at end of message)."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "fuzz.every_stage_policy", self.target]


def every_stage_fleet(
    tmp_path: Path, *bridge_flags: str
) -> contextlib.AbstractAsyncContextManager[tuple[PolicyProcess, BridgeProcess]]:
    return fleet(tmp_path, *bridge_flags, policy_process=EveryStagePolicy)


def answered_at_every_stage(report: Report) -> bool:
    """Every message answered, each with the every-stage policy's own verdict."""
    marked = report.messages // 10  # the load tool marks every 10th, exactly
    return report.ok and report.outcomes == {
        "eom continue": report.messages - marked,
        "header reject 550": marked,
    }


World = Callable[..., contextlib.AbstractAsyncContextManager[tuple[PolicyProcess, BridgeProcess]]]
# Name -> (the world, whether a load report holds only that policy's verdicts).
POLICIES: dict[str, tuple[World, Callable[[Report], bool]]] = {
    "end-of-message": (fleet, answered_by_the_policy),
    "every-stage": (every_stage_fleet, answered_at_every_stage),
}
