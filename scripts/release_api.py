"""The deliberate release step of the policy API: record proto/ as the released v1 baseline.

    python scripts/release_api.py

writes api/milter_bridge.v1.binpb (a buf image). tests/test_project.py runs
``buf breaking`` against it, so a change that breaks released v1 clients fails
the test command. Run this only when releasing: after it, the current API is
what every later change must stay compatible with.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "api" / "milter_bridge.v1.binpb"


def main() -> None:
    buf = shutil.which("buf")
    if buf is None:
        msg = "buf not found: pip install -e '.[dev]' (buf-bin)"
        raise SystemExit(msg)
    subprocess.run([buf, "build", "-o", str(BASELINE)], cwd=ROOT, check=True)  # noqa: S603
    print(f"released API baseline written to {BASELINE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
