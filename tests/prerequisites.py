"""Prerequisites of tests that need real MTAs: a skip on a developer machine, a failure in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def require(*, root: bool = False, commands: tuple[str, ...] = ()) -> None:
    """Skip (or, with CI=true, fail) unless running as root with these commands on PATH."""
    missing = [c for c in commands if shutil.which(c) is None]
    problems = ([f"not on PATH: {', '.join(missing)}"] if missing else []) + (
        ["needs root"] if root and os.geteuid() != 0 else []
    )
    if not problems:
        return
    reason = "; ".join(problems) + " (.ci/run installs and runs everything)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing prerequisite in CI: {reason}")
    pytest.skip(reason)
