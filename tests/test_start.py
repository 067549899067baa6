"""``./start``, the README's first command, as a new user runs it: a scrubbed environment
(no PATH entries, HOME or settings of this machine), the bridge with the bundled demo
policy on a unix socket, answering an MTA, and stopping on SIGINT (Ctrl-C)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from tests.runtime.mta_client import MtaClient
from tests.session import harness as h

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def scrubbed_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What .ci/run gives ./test, with ``python3`` the interpreter this .venv was made from
    (./start makes .venv anew from any other, which would pull it from under these tests)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").symlink_to(Path(sys.executable).resolve())
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": f"{shim}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), **extra}


async def test_start_serves_the_demo_policy_in_a_scrubbed_environment(tmp_path: Path) -> None:
    if Path(sys.prefix).resolve() != VENV.resolve():
        pytest.fail(f"run the tests with {VENV}/bin/python (./test does): ./start uses .venv")
    sock = tmp_path / "bridge.sock"
    env = scrubbed_env(tmp_path, LISTEN=f"unix:{sock}")
    log = (tmp_path / "start.log").open("w+b")
    proc = subprocess.Popen([str(ROOT / "start")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(1500):  # readiness: the socket accepts (the demo policy starts first)
            if proc.poll() is not None:
                break
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock))
            except OSError:
                await asyncio.sleep(0.02)
                continue
            mta = MtaClient(reader, writer)
            await mta.negotiate()
            await mta.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt())
            await mta.send(cmd.Header(b"Subject", b"hello"))
            replies = await mta.command(*h.eom())
            await mta.close()
            # The demo policy stamps a header, then accepts.
            assert isinstance(replies[0], r.AddHeader), replies
            assert replies[-1] == r.Accept()
            break
        else:
            pytest.fail("./start did not listen within 30 s")
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
        log.close()
    assert "Traceback" not in output, output
    assert f"unix:{sock}" in output, output  # it says where it listens
    assert "smtpd_milters = unix:" in output, output  # and the MTA lines to use
