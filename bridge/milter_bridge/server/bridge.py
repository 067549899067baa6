"""The bridge process: listener, connections, capabilities, channel; start, serve, drain.

SIGTERM (or SIGINT) stops accepting at once and lets the connections in
flight finish their SMTP sessions for up to ``grace_period`` seconds; those
still open then are closed, and their MTAs apply their own milter default
action. SIGHUP is logged and ignored (nothing is reloaded).

With ``--workers N`` this is one worker (server/workers.py starts N of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from milter_bridge.config import Config, ListenKind
from milter_bridge.metrics import HttpEndpoint, Metrics
from milter_bridge.server.board import Board
from milter_bridge.server.connection import MtaConnection
from milter_bridge.server.listener import Listener, ListenError, bind
from milter_bridge.upstream.capabilities import CapabilitiesCache
from milter_bridge.upstream.channel import make_channel, make_stub, process_method
from milter_bridge.upstream.pool import SharedStreams
from milter_bridge.upstream.security import BearerToken, Metadata, load_tls, no_metadata
from milter_bridge.upstream.shared import sessions_method

log = logging.getLogger("milter_bridge")
READY_INTERVAL = 0.5  # how often a worker puts its readiness on the board
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class StartError(Exception):
    """The bridge cannot start; the message names the setting and why."""


@dataclass(frozen=True)
class Place:
    """A worker's place in a bridge of several: the shared board and its slot on it."""

    board: Board
    index: int


class Bridge:
    def __init__(
        self, config: Config, listener: Listener | None = None, place: Place | None = None
    ) -> None:
        """Binds ``config.listen`` at start, or serves ``listener`` bound by a supervisor
        as the worker at ``place``."""
        self.config = config
        self._listener = listener
        self._owns_listener = False
        self._place = place
        self._ready_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopping = False
        self.metrics = Metrics()
        self._http: HttpEndpoint | None = None
        self.metrics_port = 0
        self.metadata: Callable[[], Metadata] = no_metadata

    async def start(self) -> None:
        c = self.config
        tls = (
            load_tls(
                ca=c.upstream_ca,
                cert=c.upstream_cert,
                key=c.upstream_key,
                server_name=c.upstream_server_name,
            )
            if c.tls
            else None
        )
        if c.upstream_token_file is not None:
            self.metadata = BearerToken(c.upstream_token_file).metadata
        self.channel = make_channel(c.upstream, tls)
        self.stub = make_stub(self.channel)
        self.process = process_method(self.channel)
        self.shared = None
        if c.policy_streams:
            self.shared = SharedStreams(
                sessions_method(self.channel),
                c.policy_streams,
                self.metadata,
                lambda replica: self.metrics.replica_streams.labels(replica).inc(),
                lambda replica, n: self.metrics.replica_sessions.labels(replica).inc(n),
                c.policy_stream_lifetime,
            )
        health = health_pb2_grpc.HealthStub(self.channel)
        self.capabilities = CapabilitiesCache(self.stub, c.describe_refresh, health, self.metadata)
        self.capabilities.start()
        if c.metrics_address is not None and self._place is None:  # workers: the supervisor
            host, port = c.metrics_address
            self._http = HttpEndpoint(self.metrics.render, self._ready)
            try:
                self.metrics_port = await self._http.start(host, port)
            except OSError as exc:
                msg = f"--metrics-listen {self.config.metrics_listen}: {exc.strerror or exc}"
                raise StartError(msg) from exc
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics and health on http://%s:%d/", shown, self.metrics_port)
        if self._listener is None:
            try:
                self._listener = bind(c)
            except ListenError as exc:
                raise StartError(str(exc)) from exc
            self._owns_listener = True
        listener = self._listener
        if listener.listen.kind is ListenKind.UNIX:
            self._server = await asyncio.start_unix_server(self._accept, sock=listener.sock)
        else:
            self._server = await asyncio.start_server(self._accept, sock=listener.sock)
        if self._place is None:
            log.info("listening on %s, policy at %s", self.address, c.upstream)
            for line in mta_settings(self.address):
                log.info("%s", line)
        else:
            log.info("serving (pid %d), policy at %s", os.getpid(), c.upstream)
            self._ready_task = asyncio.create_task(self._report_ready(self._place))

    async def _report_ready(self, place: Place) -> None:
        """A worker's readiness, on the board for the supervisor's /readyz."""
        while True:
            place.board.set_ready(place.index, ready=self._ready())
            await asyncio.sleep(READY_INTERVAL)

    def _ready(self) -> bool:
        ready = not self._stopping and self.capabilities.ready
        self.metrics.policy_ready.set(1 if ready else 0)
        return ready

    @property
    def address(self) -> str:
        """The listen address with the real port (when the configured port was 0)."""
        return str(self.config.listen) if self._listener is None else self._listener.address

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.port

    @property
    def connections(self) -> int:
        return len(self._tasks)

    def _channel_ready(self) -> bool:
        """Whether the channel to the policy is connected (tells unreachable from stuck)."""
        return self.channel.get_state() is grpc.ChannelConnectivity.READY

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = f"{self._prefix}.{next(self._ids)}"
        open_before = self._take_connection()
        if self._stopping or open_before >= self.config.max_connections:
            why = "shutting down" if self._stopping else f"{open_before} connections open"
            self.metrics.connections_refused.labels("shutdown" if self._stopping else "limit").inc()
            log.warning("conn=%s: refused: %s (the MTA applies its default action)", conn_id, why)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.metrics.connections.inc()
        self.metrics.connections_open.inc()
        self.metrics.worker_connections.inc()
        try:  # from here on, the connection taken is given back whatever happens
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = MtaConnection(
                conn_id,
                reader,
                writer,
                self.config,
                self.capabilities,
                self.process,
                self.metrics,
                self.metadata,
                self._channel_ready,
                self.shared,
            )
            await connection.run()
        except asyncio.CancelledError:
            pass  # closed after the grace period; the connection answered what it could
        finally:
            self._tasks.discard(task)
            self.metrics.connections_open.dec()
            if self._place is not None:
                self._place.board.give_back(self._place.index)

    def _take_connection(self) -> int:
        """The connections open before this one: in this process, or with workers in the
        whole bridge (the one taken on the board unless the limit is reached)."""
        if self._place is None:
            return len(self._tasks)
        if self._stopping:
            return 0
        return self._place.board.take(self._place.index, self.config.max_connections)

    async def stop(self) -> None:
        """Stop accepting, let connections finish within the grace period, then close the rest."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            log.info("no new connections")
        if self._tasks:
            log.info(
                "draining %d connections (up to %gs)", len(self._tasks), self.config.grace_period
            )
            _, left = await asyncio.wait(list(self._tasks), timeout=self.config.grace_period)
            if left:
                log.warning("closing %d connections still open after the grace period", len(left))
                for task in left:
                    task.cancel()
                await asyncio.wait(left, timeout=5)
        await self.capabilities.stop()
        if self.shared is not None:
            await self.shared.close()
        await self.channel.close(None)
        if self._http is not None:
            await self._http.stop()
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready_task
        if self._owns_listener and self._listener is not None:
            self._listener.remove()
        log.info("stopped")


async def serve(
    config: Config,
    listener: Listener | None = None,
    place: Place | None = None,
    supervisor: int | None = None,
) -> None:
    """Run until SIGTERM or SIGINT; a worker also stops when the pipe ``supervisor``
    (the read end of one its supervisor holds open) ends: a bridge is never left
    with workers but no supervisor."""
    bridge = Bridge(config, listener, place)
    await bridge.start()
    stop = asyncio.Event()
    why: list[str] = []

    def stop_for(reason: str) -> None:
        why.append(reason)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_for, "signal received")
    loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP ignored: nothing is reloaded")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # held back until now: see run()
    if supervisor is not None:
        loop.add_reader(supervisor, stop_for, "the supervisor is gone")
    await stop.wait()
    if supervisor is not None:
        loop.remove_reader(supervisor)
    log.info("%s: stopping", why[0])
    await bridge.stop()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` (serve or the supervisor) in an event loop, uvloop's when installed.

    SIGTERM, SIGINT and SIGHUP are blocked from here until ``main`` has its handlers:
    one that arrives while the bridge starts (binding, importing, connecting) is then
    handled, not fatal (SIGHUP's default ends a process). A worker inherits the
    blocked signals from its supervisor across exec and unblocks them the same way.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: PLC0415 - optional speed-up
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    # Outside the except block: every exception raised in the loop would
    # otherwise carry the ImportError as its context (and show it in tracebacks).
    runner(main)


def mta_settings(address: str) -> list[str]:
    """The lines that point Postfix and Sendmail at this listen address."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        postfix, sendmail = f"unix:{rest}", f"unix:{rest}"
    else:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        postfix = f"inet:{host}:{port}" if kind == "inet" else f"inet6:[{host}]:{port}"
        sendmail = f"inet:{port}@{host}" if kind == "inet" else f"inet6:{port}@{host}"
    return [
        f"Postfix main.cf: smtpd_milters = {postfix}",
        "Postfix main.cf: non_smtpd_milters = $smtpd_milters",
        f"Sendmail .mc: INPUT_MAIL_FILTER(`bridge', `S={sendmail}, F=T, T=C:10s;S:10s;R:10s;E:5m')",
    ]
