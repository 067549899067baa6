"""The bridge as its own process (``python -m milter_bridge``), for memory, descriptors, signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.runtime.mta_client import MtaClient


class BridgeProcess:
    def __init__(
        self,
        socket_path: Path,
        upstream: str,
        *flags: str,
        tcp: bool = False,
        listen: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Listens on the unix socket ``socket_path``, or with ``tcp`` on a loopback port
        of its choosing, or on ``listen`` (port 0: ``target`` names the port once
        started); the log is beside the socket. ``env``: variables added to its environment."""
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        listen = listen or ("inet:127.0.0.1:0" if tcp else f"unix:{socket_path}")
        self.tcp = not listen.startswith("unix:")
        self.port = 0
        self.address = listen
        self.env = {**os.environ, **(env or {})}
        self.argv = [
            sys.executable,
            "-m",
            "milter_bridge",
            "--listen",
            listen,
            "--upstream",
            upstream,
            *flags,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """Where an MTA connects: ``unix:/PATH``, ``inet:127.0.0.1:PORT`` or
        ``inet6:[::1]:PORT``."""
        return self.address

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        if self.tcp:
            await self._listening_on_a_port()
            return
        for _ in range(500):  # readiness: the socket accepts connections
            if self.socket_path.exists():
                try:
                    _, writer = await asyncio.open_unix_connection(str(self.socket_path))
                except OSError:
                    pass
                else:
                    writer.close()
                    await writer.wait_closed()
                    return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        msg = f"bridge did not start: {self.log()}"
        raise RuntimeError(msg)

    async def _listening_on_a_port(self) -> None:
        """Readiness over TCP: its log names the port it listens on."""
        assert self.proc is not None
        for _ in range(500):
            found = re.search(r"listening on (inet6?:\S+:(\d+)),", self.log())
            if found is not None:
                self.address, self.port = found.group(1), int(found.group(2))
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        msg = f"bridge did not start: {self.log()}"
        raise RuntimeError(msg)

    async def connect(self) -> MtaClient:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        return MtaClient(reader, writer)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status_kb(self, field: str) -> int:
        """VmRSS (now) or VmHWM (peak) of the bridge, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        msg = f"{field} not in /proc/{self.pid}/status"
        raise KeyError(msg)

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await self.wait(15)
            except TimeoutError:
                self.proc.kill()
                await self.wait(5)
