"""The policy paths the fault matrix runs against: each case takes ``policy_path``,
the bridge flags that select one, and runs once per path."""

from __future__ import annotations

import pytest

# Name -> the bridge flags that select it. Today there is one: a gRPC stream per SMTP
# session. A second path (e.g. shared streams) is one more entry here.
POLICY_PATHS: dict[str, tuple[str, ...]] = {"stream-per-session": ()}


@pytest.fixture(params=list(POLICY_PATHS))
def policy_path(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return POLICY_PATHS[request.param]
