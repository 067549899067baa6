"""Project-wide guarantees: layering, no drift in generated code, lint, types, the proto."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.tools import tool

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "bridge" / "milter_bridge" / "v1"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)


def test_protocol_and_session_import_neither_asyncio_nor_grpc() -> None:
    code = (
        "import sys\n"
        "import milter_bridge.protocol, milter_bridge.session\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'grpc'))\n"
        "print(','.join(bad))\n"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_generated_code_has_not_drifted(tmp_path: Path) -> None:
    result = _run(sys.executable, "scripts/generate_proto.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    fresh = tmp_path / "milter_bridge" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in GENERATED.iterdir() if p.name != "__pycache__")
    _match, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert (mismatch, errors) == ([], []), "run: python scripts/generate_proto.py"


def test_proto_passes_buf_lint() -> None:
    # STANDARD plus COMMENTS: every message, field, enum value, service and rpc is documented.
    result = _run(tool("buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_has_no_breaking_change_against_the_released_baseline() -> None:
    # api/milter_bridge.v1.binpb is written only by scripts/release_api.py.
    result = _run(tool("buf"), "breaking", "--against", "api/milter_bridge.v1.binpb")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    check = _run(sys.executable, "-m", "ruff", "check", ".")
    assert check.returncode == 0, check.stdout
    fmt = _run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy_strict_clean() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout
