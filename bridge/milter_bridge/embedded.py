"""``--upstream embedded``: run the bundled demo policy as a child process on a unix socket.

For trying the bridge out and for the two-command start; a real deployment
points --upstream at its own policy service.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

EMBEDDED = "embedded"


@contextlib.contextmanager
def embedded_policy() -> Iterator[str]:
    """Start ``python -m milter_policy.demo`` and yield its gRPC target; stop it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="milter-bridge-demo-"))
    socket = folder / "policy.sock"
    child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "milter_policy.demo", "--listen", f"unix:{socket}"]
    )
    try:
        for _ in range(200):  # readiness: the policy's socket exists (10 s at most)
            if socket.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        yield f"unix:{socket}"
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        socket.unlink(missing_ok=True)
        folder.rmdir()
