"""A bridge process with ``--workers N``, seen from outside: its metrics, its workers' pids."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from milter_bridge.config import ListenKind, parse_listen
from tests.runtime.mta_client import MtaClient
from tests.runtime.process import BridgeProcess
from tests.runtime.test_metrics import get


def metrics_port(bridge: BridgeProcess) -> int:
    found = re.search(r"metrics and health on http://127\.0\.0\.1:(\d+)/", bridge.log())
    assert found is not None, "the bridge serves no metrics"
    return int(found.group(1))


async def samples(bridge: BridgeProcess, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample called ``name`` on the bridge's /metrics, by its labels."""
    status, body = await get(metrics_port(bridge), "/metrics")
    assert status == 200
    return {
        frozenset(sample.labels.items()): float(sample.value)
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name
    }


async def by_worker(bridge: BridgeProcess) -> dict[int, float]:
    """MTA connections accepted by each live worker, by its pid."""
    found = await samples(bridge, "milter_bridge_worker_connections")
    return {int(dict(labels)["pid"]): value for labels, value in found.items()}


async def one(bridge: BridgeProcess, name: str) -> float:
    """The one unlabelled sample ``name`` (0 when absent)."""
    return (await samples(bridge, name)).get(frozenset(), 0.0)


async def ready(bridge: BridgeProcess) -> int:
    status, _ = await get(metrics_port(bridge), "/readyz")
    return status


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Readiness: poll ``check`` (a real signal: metrics, a log line) until it holds."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        msg = f"not within {timeout:g}s: {what}"
        raise AssertionError(msg) from None


async def connect(target: str) -> MtaClient:
    """An MTA connection to ``inet:HOST:PORT``, ``inet6:[ADDR]:PORT`` or ``unix:/PATH``."""
    listen = parse_listen(target)
    if listen.kind is ListenKind.UNIX:
        reader, writer = await asyncio.open_unix_connection(listen.path)
    else:
        reader, writer = await asyncio.open_connection(listen.host, listen.port)
    return MtaClient(reader, writer)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (an exited child not yet reaped counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(x for x in status.read_text().splitlines() if x.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "zombie" not in state
