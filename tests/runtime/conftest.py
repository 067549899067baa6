"""Fixtures of the tests that run the bridge as its own process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.runtime.policy import PolicyServer, ScriptedPolicy
from tests.session import harness as h


@pytest.fixture
async def policy() -> AsyncIterator[PolicyServer]:
    """A scripted policy on port 0 that decides at CONNECT and at end of message."""
    server = PolicyServer(ScriptedPolicy(h.capabilities(connect=h.DECIDE, end_of_message=h.DECIDE)))
    await server.start()
    yield server
    await server.stop()
