"""The per-connection milter session state machine, without I/O.

Imports neither asyncio nor grpc (tests/test_layering.py checks it).
"""

from milter_bridge.session.machine import (
    EndPolicyStream,
    FailureAction,
    Output,
    Pending,
    ProgressToMta,
    SendToMta,
    SendToPolicy,
    Session,
)
from milter_bridge.session.plan import InvalidCapabilitiesError, Plan
from milter_bridge.session.stages import Mode, Stage

__all__ = [
    "EndPolicyStream",
    "FailureAction",
    "InvalidCapabilitiesError",
    "Mode",
    "Output",
    "Pending",
    "Plan",
    "ProgressToMta",
    "SendToMta",
    "SendToPolicy",
    "Session",
    "Stage",
]
