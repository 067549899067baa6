"""What the benchmark needs besides the project, installed when missing, and the C milters built.

System packages come from Debian (apt-get, as root only): gcc and libc6-dev to
compile, libmilter-dev for the C milters and for building pymilter, and
Python's own headers (python3-dev), which pymilter's C extension also needs.
pymilter goes into the running virtual environment only, at the version
pyproject.toml's ``bench`` extra pins, so that ./test and this script install
the same one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from bench.processes import ROOT, BenchFailure

LIBMILTER_HEADER = Path("/usr/include/libmilter/mfapi.h")
C_POLICY = ROOT / "bench" / "c_policy.c"
C_HEADER_EOM = ROOT / "tests" / "load" / "c_milter.c"


def python_header() -> Path:
    return Path(sysconfig.get_paths()["include"]) / "Python.h"


def missing_packages() -> list[str]:
    """The Debian packages to install for what is missing here."""
    missing = []
    if shutil.which("gcc") is None:
        missing += ["gcc", "libc6-dev"]
    if not LIBMILTER_HEADER.exists():
        missing.append("libmilter-dev")
    if importlib.util.find_spec("Milter") is None and not python_header().exists():
        missing.append("python3-dev")
    return missing


def install_packages(packages: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        msg = f"missing: {' '.join(packages)} (Debian packages; run as root to install them)"
        raise BenchFailure(msg)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-qq"]
    subprocess.run([*apt, "update"], check=True, env=env)  # noqa: S603 - fixed argv
    install = [*apt, "install", "-y", "--no-install-recommends", *packages]
    subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)  # noqa: S603


def pymilter_requirement() -> str:
    """pymilter as pyproject.toml's ``bench`` extra pins it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = project["optional-dependencies"]["bench"]
    return str(requirement)


def install_pymilter() -> None:
    if sys.prefix == sys.base_prefix:
        msg = "pymilter is missing and this is no virtual environment: run .venv/bin/python"
        raise BenchFailure(msg)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", pymilter_requirement()]
    subprocess.run(pip, check=True)  # noqa: S603 - this interpreter's pip


def ensure_prerequisites(*, install: bool) -> None:
    """Install what is missing, or with ``install=False`` fail saying what it is."""
    packages = missing_packages()
    no_pymilter = importlib.util.find_spec("Milter") is None
    if not install and (packages or no_pymilter):
        missing = [*packages, *(["pymilter (pip)"] if no_pymilter else [])]
        msg = f"missing: {', '.join(missing)} (without --no-install the benchmark installs them)"
        raise BenchFailure(msg)
    if packages:
        install_packages(packages)
    if no_pymilter:
        install_pymilter()
        importlib.invalidate_caches()


def compile_milter(source: Path, binary: Path) -> Path:
    gcc = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(source)]
    result = subprocess.run(  # noqa: S603 - fixed argv
        [*gcc, "-lmilter", "-lpthread"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        msg = f"compiling {source} failed:\n{result.stderr}"
        raise BenchFailure(msg)
    return binary
