"""Prerequisites of tests that need real MTAs: a skip on a developer machine, a failure in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def require(*, root: bool = False, commands: tuple[str, ...] = ()) -> None:
    """Skip (or, with CI=true, fail) unless running as root with these commands on PATH.

    For commands of the system (Debian packages such as postfix, miltertest, node),
    which ./test installs as root. The project's own pip-installed tools (buf,
    hadolint) are not looked up on PATH: tests.tools.tool() finds them in the venv."""
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
