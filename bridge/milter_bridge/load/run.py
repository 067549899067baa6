"""A load run: N concurrent MTA connections in one asyncio loop, for a count or a duration.

Each of ``concurrency`` workers takes the next message number, opens a
connection when it has none, sends the message, and closes the connection
after ``messages_per_connection`` messages (or when it cannot go on, or
abandoned a message: abandon.py). The load tool's own CPU time
(``time.process_time``) is measured over the run.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Rational
from typing import TextIO

from milter_bridge.load.abandon import HOWS, Abandon
from milter_bridge.load.client import Connection, Context
from milter_bridge.load.report import Report
from milter_bridge.load.shape import Shape
from milter_bridge.load.stats import Stats
from milter_bridge.load.wire import Target


class LoadConfigError(ValueError):
    """A setting of the run that cannot work."""


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One run; exactly one of ``count`` (messages) and ``duration`` (seconds)."""

    target: str
    count: int | None = None
    duration: float | None = None
    concurrency: int = 1
    messages_per_connection: int = 1
    timeout: float = 30.0  # seconds for each answer (and to connect)
    shape: Shape = field(default_factory=Shape)
    abandon_share: Fraction = field(default_factory=Fraction)  # messages left mid-way
    abandon: str = "fin"  # how the connection then ends: "fin" or "rst"

    def __post_init__(self) -> None:
        if (self.count is None) == (self.duration is None):
            msg = "give either a message count or a duration"
            raise LoadConfigError(msg)
        if self.count is not None and self.count < 1:
            msg = f"--count must be at least 1, not {self.count}"
            raise LoadConfigError(msg)
        if self.duration is not None and not 0 < self.duration < math.inf:
            msg = f"--duration must be a positive number of seconds, not {self.duration}"
            raise LoadConfigError(msg)
        if self.concurrency < 1 or self.messages_per_connection < 1:
            msg = "--concurrency and --messages-per-connection must be at least 1"
            raise LoadConfigError(msg)
        if not 0 < self.timeout < math.inf:
            msg = f"--timeout must be a positive number of seconds, not {self.timeout}"
            raise LoadConfigError(msg)
        share: object = self.abandon_share  # a float would pick messages inexactly
        if not isinstance(share, Rational):
            msg = f"--abandon-share must be a Fraction such as Fraction(1, 10), not {share!r}"
            raise LoadConfigError(msg)
        if not 0 <= self.abandon_share <= 1:
            msg = f"--abandon-share must be between 0 and 1, not {float(self.abandon_share)}"
            raise LoadConfigError(msg)
        if self.abandon not in HOWS:
            msg = f"--abandon must be fin or rst, not {self.abandon!r}"
            raise LoadConfigError(msg)


class _Budget:
    """Hands out message numbers until the count is reached or the time is up."""

    def __init__(self, count: int | None, deadline: float | None) -> None:
        self._count = count
        self._deadline = deadline
        self.taken = 0

    def take(self) -> int | None:
        if self._count is not None and self.taken >= self._count:
            return None
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return None
        self.taken += 1
        return self.taken - 1


async def _worker(ctx: Context, budget: _Budget, per_connection: int) -> None:
    connection: Connection | None = None
    while (k := budget.take()) is not None:
        if connection is None:
            connection = Connection(ctx)
            if not await connection.start(k):
                connection = None
                continue
        await connection.send_message(k)
        if not connection.usable or connection.messages >= per_connection:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


async def _show_progress(stats: Stats, out: TextIO, started: float) -> None:
    last, last_at = 0, started
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        rate = (stats.messages - last) / (now - last_at)
        last, last_at = stats.messages, now
        out.write(
            f"\r{now - started:6.0f}s {stats.messages:9d} messages {rate:8.0f} msg/s"
            f" {stats.error_count:6d} protocol errors "
        )
        out.flush()


async def run(config: LoadConfig, *, progress: TextIO | None = None) -> Report:
    """Run the load and return its report; ``progress`` gets a live line once a second.

    Raises ConfigError for a TARGET that is not inet:HOST:PORT or unix:/PATH."""
    target = Target(config.target)
    stats = Stats()
    abandon = Abandon(Fraction(config.abandon_share), config.abandon)
    ctx = Context(target, config.shape, stats, config.timeout, abandon)
    started = time.monotonic()
    deadline = None if config.duration is None else started + config.duration
    budget = _Budget(config.count, deadline)
    cpu_started = time.process_time()
    ticker = None
    if progress is not None:
        ticker = asyncio.create_task(_show_progress(stats, progress, started))
    try:
        workers = config.concurrency
        if config.count is not None:
            workers = min(workers, config.count)
        await asyncio.gather(
            *(_worker(ctx, budget, config.messages_per_connection) for _ in range(workers))
        )
        while ctx.closing:
            await asyncio.wait(list(ctx.closing))
    finally:
        if ticker is not None:
            ticker.cancel()
            assert progress is not None
            progress.write("\r" + " " * 72 + "\r")
            progress.flush()
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu_started
    return Report.build(config_summary(config, target), stats, elapsed, cpu)


def config_summary(config: LoadConfig, target: Target) -> dict[str, object]:
    shape = config.shape
    return {
        "target": str(target),
        "count": config.count,
        "duration_s": config.duration,
        "concurrency": config.concurrency,
        "messages_per_connection": config.messages_per_connection,
        "timeout_s": config.timeout,
        "headers": shape.headers,
        "body_size": shape.body_size,
        "recipients": shape.recipients,
        "marker": shape.marker,
        "marker_share": float(shape.marker_share),
        "abandon_share": float(config.abandon_share),
        "abandon": config.abandon,
    }


def run_sync(config: LoadConfig, *, progress: TextIO | None = None) -> Report:
    """``run`` in a new event loop (the CLI); uvloop's when it is installed, as the server."""
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: PLC0415 - optional speed-up
    except ImportError:
        loop_run = asyncio.run
    else:
        loop_run = uvloop.run
    return loop_run(run(config, progress=progress))


def stderr_if_tty(*, quiet: bool) -> TextIO | None:
    return None if quiet or not sys.stderr.isatty() else sys.stderr
