"""``milter-bridge load`` against a milter built on sendmail's libmilter (tests/load/c_milter.c).

The C milter is compiled here with gcc and libmilter-dev (./test installs both
as root); it adds ``X-Bench: 1`` at end of message or rejects a marked Subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import pytest

from milter_bridge.load import LoadConfig, Shape, run
from tests.prerequisites import require

SOURCE = Path(__file__).with_name("c_milter.c")
LIBMILTER_HEADER = Path("/usr/include/libmilter/mfapi.h")


def require_libmilter() -> None:
    require(commands=("gcc",))
    if not LIBMILTER_HEADER.exists():
        reason = f"no {LIBMILTER_HEADER} (Debian: libmilter-dev; ./test installs it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing prerequisite in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def c_milter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_libmilter()
    binary = tmp_path_factory.mktemp("c_milter") / "c_milter"
    compile_it = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)]
    result = subprocess.run(
        [*compile_it, "-lmilter", "-lpthread"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return binary


@contextlib.asynccontextmanager
async def started(binary: Path, socket_dir: Path, *mode: str) -> AsyncIterator[str]:
    """The C milter on a unix socket; yields the load tool's target once it listens."""
    target = f"unix:{socket_dir / 'milter.sock'}"
    proc = await asyncio.create_subprocess_exec(
        binary, target, "REJECT", *mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert ready == b"ready\n", ready + await proc.stderr.read()
        yield target
    finally:
        # libmilter notices SIGTERM only at its listener's next poll timeout (seconds).
        proc.kill()
        await proc.wait()


def shape() -> Shape:
    return Shape(marker_share=Fraction(1, 10))


async def test_libmilter_with_its_default_negotiation(
    c_milter: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with started(c_milter, tmp_path_factory.mktemp("s")) as target:
        report = await run(LoadConfig(target, count=60, concurrency=4, shape=shape()))
    assert report.ok, report.protocol_errors
    assert report.outcomes == {"eom continue": 54, "eom reject 550": 6}
    assert report.modifications == {"add_header": 54}
    (negotiated,) = report.negotiated
    # libmilter opts out of the events without a callback; headers are answered one by one.
    assert negotiated.protocol == "0x75F"


async def test_libmilter_negotiating_no_reply_leading_space_and_macros(
    c_milter: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with started(c_milter, tmp_path_factory.mktemp("s"), "nr") as target:
        config = LoadConfig(
            target, count=60, concurrency=4, messages_per_connection=5, shape=shape()
        )
        report = await run(config)
    assert report.ok, report.protocol_errors
    # The C milter tempfails a message whose end-of-message macros it did not get.
    assert report.outcomes == {"eom continue": 54, "eom reject 550": 6}
    assert report.modifications == {"add_header": 54}
    (negotiated,) = report.negotiated
    assert negotiated.protocol == "0x1003DF"  # NO*, NR_HDR, HDR_LEADSPC
    assert negotiated.macros == {"eom": "i {mail_addr}"}


async def test_libmilter_from_the_command_line(
    c_milter: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with started(c_milter, tmp_path_factory.mktemp("s"), "nr") as target:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "milter_bridge", "load", target, "--json", "--count", "100",
            "--concurrency", "8", "--marker-share", "0.1", "--recipients", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["outcomes"] == {"eom continue": 90, "eom reject 550": 10}
    assert report["protocol_errors"]["total"] == 0
