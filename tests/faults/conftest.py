"""The policy paths the fault matrix runs against: each case takes ``policy_path``,
the bridge flags that select one, and runs once per path."""

from __future__ import annotations

import pytest

# Name -> the bridge flags that select it: a Process stream per SMTP session, or the
# sessions on long-lived shared streams (the SDK's policies offer both). A stream
# lifetime of 2 s lets a restarted replica take sessions again within the tests' waits.
POLICY_PATHS: dict[str, tuple[str, ...]] = {
    "stream-per-session": ("--policy-streams", "0"),
    "shared-streams": ("--policy-streams", "4", "--policy-stream-lifetime", "2"),
}


SHARED = POLICY_PATHS["shared-streams"]


@pytest.fixture(params=list(POLICY_PATHS))
def policy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    monkeypatch.setenv("FAULTS_PATH", request.param)  # for record.Row
    return POLICY_PATHS[request.param]
