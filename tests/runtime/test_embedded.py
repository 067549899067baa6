"""``milter-bridge --upstream embedded``: the bridge with the bundled demo policy, as processes."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from milter_bridge.protocol import replies as r
from tests.runtime.mta_client import MtaClient
from tests.session import harness as h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_bridge_with_the_bundled_demo_policy() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "milter_bridge", "--listen", f"inet:127.0.0.1:{port}",
        "--upstream", "embedded", "--describe-wait", "10",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    while not any("Sendmail .mc:" in line for line in lines):  # readiness: the start-up lines
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "\n".join(lines)
        lines.append(line)
    log = "".join(lines)
    assert f"Postfix main.cf: smtpd_milters = inet:127.0.0.1:{port}" in log
    assert f"INPUT_MAIL_FILTER(`bridge', `S=inet:{port}@127.0.0.1, F=T" in log
    drain = asyncio.create_task(proc.stderr.read())  # the pipe must not fill up
    try:
        mta = await MtaClient.connect(port)
        await mta.negotiate()
        await mta.send(*h.connect(), *h.mail(), *h.rcpt())
        replies = await mta.command(*h.eom())
        assert replies == [r.AddHeader(b"X-Milter-Bridge", b"checked (queue id QID1)"), r.Accept()]
        await mta.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await drain
