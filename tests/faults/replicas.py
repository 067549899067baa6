"""Several replicas of the RCPT + end-of-message policy (tests/faults/replica.py) on
loopback ports, behind one bridge (``--upstream ipv4:127.0.0.1:P1,127.0.0.1:P2,…``,
round_robin), each to be killed, stopped or restarted on its own port."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from milter_bridge.load import Report
from tests.faults.fleet import ROOT
from tests.runtime.process import BridgeProcess


class Replica:
    def __init__(self, log_path: Path, eom_delay: float = 0.0) -> None:
        self.log_path = log_path
        self.eom_delay = eom_delay
        self.port = 0  # chosen by the first start, kept by restarts
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.faults.replica",
                    f"127.0.0.1:{self.port}",
                    str(self.eom_delay),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
            )
        assert self.proc.stdout is not None
        # Readiness: it prints its port once it serves.
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        if not line.startswith(b"port "):
            msg = f"replica did not start: {self.log_path.read_text()}"
            raise RuntimeError(msg)
        self.port = int(line.split()[1])

    async def restart(self) -> None:
        """Started again on the same port, once the old process is gone."""
        assert self.proc is not None
        await asyncio.to_thread(self.proc.wait)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        await self.start()

    async def exited(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@contextlib.asynccontextmanager
async def replica_fleet(
    tmp_path: Path, count: int, *bridge_flags: str, tcp: bool = False, eom_delay: float = 0.0
) -> AsyncIterator[tuple[list[Replica], BridgeProcess]]:
    """``count`` replicas behind one bridge, which listens on a unix socket (or, with
    ``tcp``, a loopback port); ``eom_delay``: how long each takes at end of message."""
    replicas = [Replica(tmp_path / f"replica-{n}.log", eom_delay) for n in range(count)]
    bridge = None
    try:
        for replica in replicas:
            await replica.start()
        upstream = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
        bridge = BridgeProcess(tmp_path / "bridge.sock", upstream, *bridge_flags, tcp=tcp)
        await bridge.start()
        yield replicas, bridge
    finally:
        if bridge is not None:
            await bridge.stop()
        for replica in replicas:
            await replica.stop()


def decided_by_the_policy(report: Report) -> bool:
    """Every message of a two-recipient load answered by the replicas' own decisions:
    rcpt2 refused at RCPT, then the end-of-message verdict (every 10th marked)."""
    marked = report.messages // 10
    return (
        report.ok
        and report.refused_recipients == {"reject 550": report.messages}
        and report.outcomes
        == {
            k: n
            for k, n in (("eom continue", report.messages - marked), ("eom reject 550", marked))
            if n
        }
    )
