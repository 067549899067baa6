"""The fuzz targets (fuzz/): seeds and regression inputs replayed, and a short atheris run each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

FUZZ = Path(__file__).parents[2] / "fuzz"

# Regression inputs that still find a bug: name -> the bug (reported, not fixed yet).


def _inputs(kind: str) -> list[object]:
    cases: list[object] = []
    for name in TARGETS:
        for path in sorted((FUZZ / kind / name).glob("*")):
            if path.name.startswith("."):
                continue
            cases.append(pytest.param(name, path, id=f"{name}/{path.name[:16]}"))
    return cases


def test_every_target_has_seeds() -> None:
    for name in TARGETS:
        assert len(list((FUZZ / "corpus" / name).iterdir())) >= 10, name


@pytest.mark.parametrize(("target", "path"), _inputs("corpus"))
def test_seed(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize(("target", "path"), _inputs("regressions"))
def test_regression(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_atheris_run(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            target,
            "-runs=3000",
            "-max_total_time=12",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
            str(FUZZ / "corpus" / target),
        ],
        cwd=FUZZ.parent,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done" in run.stderr
