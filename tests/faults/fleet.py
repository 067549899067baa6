"""The fault matrix's world: policy processes and the bridge as a process, all real.

A case starts what it needs, loads it with the project's own load tool
(``milter_bridge.load``), injects its fault from outside (signals, kills) and
checks what the MTA side got. The policy path under test is the one a user runs:
``bench/sdk_policy.py`` (an SDK policy deciding at end of message) in its own
process, behind ``python -m milter_bridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from milter_bridge.load import LoadConfig, Report, Shape, run
from tests.runtime.process import BridgeProcess
from tests.runtime.test_metrics import get

ROOT = Path(__file__).resolve().parents[2]  # bench/ is a package at the top
MARKER = "REJECT"
SHARE = Fraction(1, 10)


class PolicyProcess:
    """``python -m bench.sdk_policy unix:PATH REJECT``: adds X-Bench: 1, or rejects marked."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    def argv(self) -> list[str]:
        """The policy's command line; another policy process overrides only this."""
        return [sys.executable, "-m", "bench.sdk_policy", self.target, MARKER]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        for _ in range(1000):  # readiness: its socket accepts connections
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_unix_connection(str(self.socket_path))
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.02)
        msg = f"policy did not start ({' '.join(self.argv()[1:])}): {self.log()}"
        raise RuntimeError(msg)

    async def restart(self) -> None:
        """Started again on the same socket, after the old process is gone."""
        assert self.proc is not None
        await asyncio.to_thread(self.proc.wait)
        await self.start()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot end otherwise
            self.proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 15)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path,
    *bridge_flags: str,
    tcp: bool = False,
    policy_process: type[PolicyProcess] = PolicyProcess,
) -> AsyncIterator[tuple[PolicyProcess, BridgeProcess]]:
    """A policy (the benchmark's SDK policy unless ``policy_process`` says another) and
    the bridge, which listens on a unix socket (or a loopback port)."""
    policy = policy_process(tmp_path / "policy.sock")
    await policy.start()
    bridge = BridgeProcess(tmp_path / "bridge.sock", policy.target, *bridge_flags, tcp=tcp)
    try:
        await bridge.start()
        yield policy, bridge
    finally:
        await bridge.stop()
        await policy.stop()


async def load(
    bridge: BridgeProcess,
    count: int,
    concurrency: int = 8,
    *,
    recipients: int = 1,
    per_connection: int = 1,
    abandon_share: Fraction = Fraction(0),
    abandon: str = "fin",
) -> Report:
    """``count`` messages (every 10th marked) from ``concurrency`` MTA connections at once;
    ``abandon_share`` of them left mid-way by the MTA (``abandon``: "fin" or "rst")."""
    config = LoadConfig(
        bridge.target,
        count=count,
        concurrency=concurrency,
        messages_per_connection=per_connection,
        shape=Shape(recipients=recipients, marker_share=SHARE, marker=MARKER),
        abandon_share=abandon_share,
        abandon=abandon,
    )
    return await run(config)


def answered_by_the_policy(report: Report) -> bool:
    """Every message answered, each with the policy's own verdict."""
    marked = report.messages // 10  # the load tool marks every 10th, exactly
    expected = {"eom continue": report.messages - marked, "eom reject 550": marked}
    return report.ok and report.outcomes == {k: n for k, n in expected.items() if n}


async def fds_settle(bridge: BridgeProcess, baseline: int, timeout: float = 20.0) -> int:
    """The bridge's open descriptors once they are back within baseline + 1 (the
    connections' policy streams close up to 10 s after QUIT), or as they are then."""
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while (fds := bridge.open_fds()) > baseline + 1 and loop.time() < until:
        await asyncio.sleep(0.1)
    return fds


def messages_ended(bridge: BridgeProcess) -> int:
    """How many messages the bridge has logged as ended (one INFO line each)."""
    return bridge.log().count(" end of message: ")


async def until_messages_ended(bridge: BridgeProcess, at_least: int) -> None:
    """Readiness: the bridge's log shows ``at_least`` ended messages."""
    async with asyncio.timeout(60):
        while messages_ended(bridge) < at_least:
            await asyncio.sleep(0.02)


async def metric(bridge: BridgeProcess, name: str, **labels: str) -> float:
    """One sample of the bridge's /metrics (it runs with ``--metrics-listen 127.0.0.1:0``)."""
    found = re.search(r"metrics and health on http://127\.0\.0\.1:(\d+)/", bridge.log())
    assert found is not None, "the bridge serves no metrics"
    status, body = await get(int(found.group(1)), "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
