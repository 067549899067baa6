"""``--workers 2``: one listen socket (inet, inet6, unix) served by two workers.

Connections spread over both; ``--max-connections`` holds for the whole bridge;
a killed worker is replaced while the other serves; SIGTERM drains both; and
workers whose supervisor is gone stop by themselves. Through real MTAs:
tests/mta/test_workers_postfix.py and the verdicts of the conformance suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.server.workers import next_pause
from tests.runtime.mta_client import MtaClient
from tests.runtime.policy import PolicyServer
from tests.runtime.process import BridgeProcess
from tests.runtime.test_metrics import get
from tests.runtime.workers import (
    alive,
    by_worker,
    connect,
    metrics_port,
    one,
    ready,
    samples,
    until,
)
from tests.session import harness as h

METRICS = ("--metrics-listen", "127.0.0.1:0")


@pytest.fixture
async def workers(
    policy: PolicyServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[BridgeProcess]:
    """The bridge with two workers on ``listen`` (a parameter: inet by default)."""
    listen = getattr(request, "param", "inet:127.0.0.1:0").replace("TMP", str(tmp_path))
    async with two_workers(policy, tmp_path, listen) as bridge:
        yield bridge


@contextlib.asynccontextmanager
async def two_workers(
    policy: PolicyServer, tmp_path: Path, listen: str, *flags: str
) -> AsyncIterator[BridgeProcess]:
    """Started, both workers ready, and stopped afterwards whatever happened."""
    # Its private folder under tmp_path: a supervisor killed here cannot remove it.
    bridge = BridgeProcess(
        tmp_path / "bridge.sock",
        policy.target,
        "--workers",
        "2",
        *METRICS,
        *flags,
        listen=listen,
        env={"TMPDIR": str(tmp_path)},
    )
    try:
        await bridge.start()
        await until(lambda: _ready(bridge), "both workers ready")
        yield bridge
    finally:
        await bridge.stop()


async def _ready(bridge: BridgeProcess) -> bool:
    return await ready(bridge) == 200


async def _not_ready(bridge: BridgeProcess) -> bool:
    return await ready(bridge) == 503


async def session(mta: MtaClient) -> None:
    """A whole SMTP session's milter conversation, answered by the policy."""
    assert await mta.command(*h.connect()) == [r.Continue()]
    assert await mta.command(*h.eom()) == [r.Continue()]
    await mta.send(cmd.Quit())
    assert await mta.closed_by_peer()
    await mta.close()


async def spread(bridge: BridgeProcess, rounds: int = 20) -> dict[int, float]:
    """Sessions, eight at once, until both workers have taken some (or ``rounds`` ran out)."""
    for _ in range(rounds):
        clients = await asyncio.gather(*(connect(bridge.target) for _ in range(8)))
        await asyncio.gather(*(c.negotiate() for c in clients))
        await asyncio.gather(*(session(c) for c in clients))
        counts = await by_worker(bridge)
        if len(counts) == 2 and min(counts.values()) > 0:
            break
    return counts


async def one_on_each(
    bridge: BridgeProcess,
) -> tuple[dict[int, MtaClient], list[MtaClient]]:
    """A negotiated connection held open on each worker, by its pid, and those that
    landed on a worker already holding one."""
    held: dict[int, MtaClient] = {}
    extra: list[MtaClient] = []
    for _ in range(50):
        before = await by_worker(bridge)
        client = await connect(bridge.target)
        await client.negotiate()  # the worker counted it on accept, before this answer
        after = await by_worker(bridge)
        pid = next(p for p in after if after[p] > before.get(p, 0))
        if pid in held:
            extra.append(client)
        else:
            held[pid] = client
        if len(held) == 2:
            return held, extra
    msg = f"50 connections, all on one worker: {held}"
    raise AssertionError(msg)


LISTENERS = ["inet:127.0.0.1:0", "inet6:[::1]:0", "unix:TMP/bridge.sock"]


@pytest.mark.parametrize("workers", LISTENERS, indirect=True, ids=["inet", "inet6", "unix"])
async def test_both_workers_serve_each_kind_of_listener(workers: BridgeProcess) -> None:
    counts = await spread(workers)
    assert len(counts) == 2, counts
    assert min(counts.values()) > 0, counts
    assert set(counts) <= {p for p in counts if p != workers.pid}  # workers, not the supervisor
    # The aggregated counters add up the workers' own.
    assert await one(workers, "milter_bridge_connections_total") == sum(counts.values())
    assert await one(workers, "milter_bridge_workers") == 2
    # The supervisor runs no gRPC object (gRPC would start threads): one thread.
    assert len(list(Path(f"/proc/{workers.pid}/task").iterdir())) == 1


async def test_max_connections_counts_the_whole_bridge(
    policy: PolicyServer, tmp_path: Path
) -> None:
    async with two_workers(
        policy, tmp_path, "inet:127.0.0.1:0", "--max-connections", "4"
    ) as bridge:
        held = []
        for _ in range(4):
            client = await connect(bridge.target)
            await client.negotiate()
            held.append(client)
        assert await one(bridge, "milter_bridge_connections_open") == 4
        # Whichever worker takes them, each further connection is closed at once.
        for _ in range(10):
            extra = await connect(bridge.target)
            assert await extra.closed_by_peer()
            await extra.close()
        refused = await by_reason(bridge)
        assert refused == {"limit": 10}
        # One closes; the bridge takes a connection again.
        await held.pop().close()
        await until(lambda: _open_is(bridge, 3), "the closed connection given back", timeout=10)
        again = await connect(bridge.target)
        await again.negotiate()
        await session(again)
        for client in held:
            await session(client)


async def _open_is(bridge: BridgeProcess, count: int) -> bool:
    return await one(bridge, "milter_bridge_connections_open") == count


async def by_reason(bridge: BridgeProcess) -> dict[str, float]:
    found = await samples(bridge, "milter_bridge_connections_refused_total")
    return {dict(labels)["reason"]: value for labels, value in found.items()}


async def test_a_killed_worker_is_replaced_while_the_other_serves(
    workers: BridgeProcess,
) -> None:
    await spread(workers)
    held, extra = await one_on_each(workers)
    for client in extra:
        await session(client)
    victim, survivor = sorted(held)
    os.kill(victim, signal.SIGKILL)
    assert await held[victim].closed_by_peer()  # lost with its worker: the MTA's default
    await held[victim].close()
    # The other worker goes on with its session and takes new ones.
    await session(held[survivor])
    fresh = await connect(workers.target)
    await fresh.negotiate()
    await session(fresh)
    # The worker comes back: a new pid, both ready, and it takes sessions too.
    await until(lambda: _replaced(workers, victim), "a new worker in the killed one's place")
    await until(lambda: _ready(workers), "ready again")
    counts = await spread(workers)
    assert victim not in counts
    assert survivor in counts
    assert min(counts.values()) > 0, counts
    assert await one(workers, "milter_bridge_worker_restarts_total") == 1
    assert f"(pid {victim}) was killed by SIGKILL" in workers.log()


async def _replaced(bridge: BridgeProcess, gone: int) -> bool:
    counts = await by_worker(bridge)
    return len(counts) == 2 and gone not in counts


async def test_sigterm_drains_both_workers(workers: BridgeProcess) -> None:
    await spread(workers)
    held, extra = await one_on_each(workers)
    for client in [*held.values(), *extra]:
        assert await client.command(*h.connect()) == [r.Continue()]
    workers.signal(signal.SIGTERM)
    # Barrier: both workers have closed their listeners, and so has the supervisor.
    await until(lambda: _logged(workers, "no new connections", 2), "both workers stop accepting")
    with pytest.raises(ConnectionRefusedError):
        await connect(workers.target)
    # The sessions in flight on both workers go on to the end.
    for client in [*held.values(), *extra]:
        assert await client.command(*h.eom()) == [r.Continue()]
        await client.send(cmd.Quit())
        assert await client.closed_by_peer()
        await client.close()
    assert await workers.wait() == 0
    log = workers.log()
    assert log.count("exited with status 0") == 2
    assert " ERROR " not in log


async def _logged(bridge: BridgeProcess, text: str, count: int) -> bool:
    return bridge.log().count(text) >= count


async def test_workers_stop_when_the_supervisor_is_gone(workers: BridgeProcess) -> None:
    pids = list(await spread(workers))
    workers.signal(signal.SIGKILL)
    assert await workers.wait() == -signal.SIGKILL
    try:
        # Each worker sees its supervisor's pipe end, drains (nothing open) and exits.
        await until(lambda: _all_gone(pids), "the orphaned workers exit")
    finally:
        for pid in pids:  # ours (the bridge we started started them): never left running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert workers.log().count("the supervisor is gone: stopping") == 2
    # What the supervisor could not remove: its private folder (and no worker's files).
    (left,) = workers.socket_path.parent.glob("milter-bridge-workers-*")
    assert (left / "board").exists()


async def _all_gone(pids: list[int]) -> bool:
    return not any(alive(pid) for pid in pids)


async def test_a_worker_dying_young_is_replaced_after_a_growing_pause(
    workers: BridgeProcess,
) -> None:
    before = set(await by_worker(workers))
    first = min(before)
    os.kill(first, signal.SIGKILL)  # within 10 s of its start
    await until(lambda: _replaced(workers, first), "the first replacement")
    (second,) = set(await by_worker(workers)) - before
    os.kill(second, signal.SIGKILL)
    # For the pause (1 s) and the new worker's start, one worker is missing: not ready.
    await until(lambda: _not_ready(workers), "/readyz 503 while a worker is missing", 1.0)
    await until(lambda: _replaced(workers, second), "the second replacement")
    await until(lambda: _ready(workers), "ready again")
    # The first may have lived 10 s before the kill on a slow machine (no pause); the
    # second, killed as soon as it served, died young: its pause is the next one.
    first_pause, second_pause = (restart_pause(workers.log(), pid) for pid in (first, second))
    assert first_pause in (0.0, 0.5)
    assert second_pause == max(first_pause * 2, 0.5)


def restart_pause(log: str, pid: int) -> float:
    """The pause the supervisor logged before replacing the killed worker ``pid``."""
    lost = "was killed by SIGKILL; its MTA connections are lost; starting another"
    found = re.search(rf"\(pid {pid}\) {lost}(?: in ([\d.]+)s)?$", log, re.MULTILINE)
    assert found is not None, log
    return float(found.group(1) or 0)


def test_the_pause_before_a_restart() -> None:
    assert next_pause(0.0, lived=60.0) == 0.0  # a worker that ran a while: at once
    pauses = [0.0]
    for _ in range(8):
        pauses.append(next_pause(pauses[-1], lived=1.0))
    assert pauses[1:] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert next_pause(30.0, lived=10.0) == 0.0  # back to none once one lives


async def test_sighup_is_logged_and_ignored(workers: BridgeProcess) -> None:
    pids = set(await spread(workers))
    workers.signal(signal.SIGHUP)
    os.kill(min(pids), signal.SIGHUP)
    await until(lambda: _logged(workers, "SIGHUP ignored: nothing is reloaded", 2), "both logged")
    counts = await spread(workers)
    assert set(counts) == pids  # the same workers, serving
    assert await one(workers, "milter_bridge_worker_restarts_total") == 0


@pytest.mark.parametrize("workers", ["unix:TMP/bridge.sock"], indirect=True, ids=["unix"])
async def test_a_taken_address_stops_the_supervisor_at_start(
    workers: BridgeProcess, policy: PolicyServer, tmp_path: Path
) -> None:
    """As one process does: exit status 1, the setting named, the first instance unharmed."""
    port = metrics_port(workers)
    cases = [
        (("--listen", workers.target), "--listen: another process listens on"),
        (
            ("--listen", f"unix:{tmp_path}/other.sock", "--metrics-listen", f"127.0.0.1:{port}"),
            f"milter-bridge: --metrics-listen 127.0.0.1:{port}: ",
        ),
    ]
    for flags, message in cases:
        argv = [sys.executable, "-m", "milter_bridge", "--upstream", policy.target, "--workers"]
        result = await asyncio.to_thread(
            subprocess.run,
            [*argv, "2", *flags],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 1
        assert message in result.stderr
    assert not (tmp_path / "other.sock").exists()
    counts = await spread(workers)
    assert min(counts.values()) > 0


async def test_a_worker_stopped_on_its_own_is_replaced_after_a_second(
    workers: BridgeProcess,
) -> None:
    """A worker SIGTERMed alone drains and exits 0; the supervisor starts another after 1 s
    (when every process gets the signal at once, the supervisor's own comes first)."""
    before = set(await by_worker(workers))
    stopped = min(before)
    os.kill(stopped, signal.SIGTERM)
    await until(lambda: _replaced(workers, stopped), "a new worker in the stopped one's place")
    await until(lambda: _ready(workers), "ready again")
    assert f"(pid {stopped}) stopped on its own; starting another in 1s" in workers.log()
    assert " ERROR " not in workers.log()


async def test_the_supervisors_signal_within_the_pause_starts_no_worker(
    workers: BridgeProcess,
) -> None:
    """A worker stopped on its own is not started again when the supervisor is told to
    stop within the pause: what happens when systemd or a Ctrl-C signals every process
    and a worker's exit is seen first."""
    stopped = min(await by_worker(workers))
    os.kill(stopped, signal.SIGTERM)
    warning = f"(pid {stopped}) stopped on its own; starting another in 1s"
    await until(lambda: _logged(workers, warning, 1), "the worker's exit seen")
    workers.signal(signal.SIGTERM)  # within the second
    assert await workers.wait() == 0
    log = workers.log()
    assert " started (pid" not in log.partition(warning)[2]
    assert " ERROR " not in log


async def test_a_worker_killed_by_any_signal_is_replaced(workers: BridgeProcess) -> None:
    """A real-time signal has no name in Python's signal.Signals."""
    victim = min(await by_worker(workers))
    os.kill(victim, signal.SIGRTMIN + 1)
    await until(lambda: _replaced(workers, victim), "a new worker in the killed one's place")
    assert f"(pid {victim}) was killed by signal {signal.SIGRTMIN + 1};" in workers.log()


async def test_a_worker_whose_loop_hangs_is_not_ready(workers: BridgeProcess) -> None:
    stuck = min(await by_worker(workers))
    os.kill(stuck, signal.SIGSTOP)
    try:
        await until(lambda: _not_ready(workers), "/readyz 503 for a worker that says nothing")
    finally:
        os.kill(stuck, signal.SIGCONT)
    await until(lambda: _ready(workers), "ready again once it goes on")
    assert stuck in await by_worker(workers)  # the same worker: not replaced


async def test_metrics_during_the_drain_and_of_workers_gone(workers: BridgeProcess) -> None:
    await spread(workers)
    victim = min(await by_worker(workers))
    accepted = await one(workers, "milter_bridge_connections_total")
    os.kill(victim, signal.SIGKILL)
    await until(lambda: _replaced(workers, victim), "a new worker in the killed one's place")
    # The dead worker's counters are kept, folded into one archive file.
    assert await one(workers, "milter_bridge_connections_total") == accepted
    (folder,) = workers.socket_path.parent.glob("milter-bridge-workers-*")
    names = {p.name for p in folder.iterdir()}
    assert {"counter_archive.db", "histogram_archive.db"} <= names
    assert not any(name.endswith(f"_{victim}.db") for name in names)
    # A session held open through SIGTERM: /metrics and /healthz go on, /readyz says no.
    held = await connect(workers.target)
    await held.negotiate()
    workers.signal(signal.SIGTERM)
    await until(lambda: _not_ready(workers), "/readyz 503 once stopping")
    assert await one(workers, "milter_bridge_connections_open") >= 1  # /metrics answers
    assert (await get(metrics_port(workers), "/healthz"))[0] == 200
    await session(held)
    assert await workers.wait() == 0
