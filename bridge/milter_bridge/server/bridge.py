"""The bridge process: listener, connections, capabilities, channel; start, serve, drain.

SIGTERM (or SIGINT) stops accepting at once and lets the connections in
flight finish their SMTP sessions for up to ``grace_period`` seconds; those
still open then are closed, and their MTAs apply their own milter default
action.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from milter_bridge.config import Config, ListenKind
from milter_bridge.metrics import HttpEndpoint, Metrics
from milter_bridge.server.connection import MtaConnection
from milter_bridge.upstream.capabilities import CapabilitiesCache
from milter_bridge.upstream.channel import make_channel, make_stub, process_method
from milter_bridge.upstream.pool import SharedStreams
from milter_bridge.upstream.security import BearerToken, Metadata, load_tls, no_metadata
from milter_bridge.upstream.shared import sessions_method

log = logging.getLogger("milter_bridge")


class StartError(Exception):
    """The bridge cannot start; the message names the setting and why."""


class Bridge:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopping = False
        self.metrics = Metrics()
        self._http: HttpEndpoint | None = None
        self.metrics_port = 0
        self.metadata: Callable[[], Metadata] = no_metadata
        self._socket_inode = -1

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
        if c.metrics_address is not None:
            host, port = c.metrics_address
            self._http = HttpEndpoint(self.metrics, self._ready)
            try:
                self.metrics_port = await self._http.start(host, port)
            except OSError as exc:
                msg = f"--metrics-listen {self.config.metrics_listen}: {exc.strerror or exc}"
                raise StartError(msg) from exc
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics and health on http://%s:%d/", shown, self.metrics_port)
        listen = self.config.listen
        try:
            if listen.kind is ListenKind.UNIX:
                self._server = await self._start_unix(Path(listen.path))
            else:
                self._server = await asyncio.start_server(
                    self._accept, listen.host, listen.port, reuse_address=True
                )
        except OSError as exc:  # e.g. the address is taken
            msg = f"--listen {listen}: {exc.strerror or exc}"
            raise StartError(msg) from exc
        log.info("listening on %s, policy at %s", self.address, self.config.upstream)
        for line in mta_settings(self.address):
            log.info("%s", line)

    def _ready(self) -> bool:
        ready = not self._stopping and self.capabilities.ready
        self.metrics.policy_ready.set(1 if ready else 0)
        return ready

    @property
    def address(self) -> str:
        """The listen address with the real port (when the configured port was 0)."""
        listen = self.config.listen
        if listen.kind is ListenKind.UNIX or self._server is None:
            return str(listen)
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{listen.host}]" if listen.kind is ListenKind.INET6 else listen.host
        return f"{listen.kind.value}:{host}:{port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def _start_unix(self, path: Path) -> asyncio.Server:
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                msg = f"--listen: {path} exists and is not a socket"
                raise StartError(msg)
            if await _in_use(path):
                msg = f"--listen: another process listens on {path}"
                raise StartError(msg)
            path.unlink()  # a stale socket of an earlier run
        server = await asyncio.start_unix_server(self._accept, str(path))
        self._socket_inode = path.stat().st_ino
        if self.config.socket_group is not None:
            os.chown(path, -1, grp.getgrnam(self.config.socket_group).gr_gid)
        if self.config.socket_mode is not None:
            path.chmod(self.config.socket_mode)
        return server

    def _channel_ready(self) -> bool:
        """Whether the channel to the policy is connected (tells unreachable from stuck)."""
        return self.channel.get_state() is grpc.ChannelConnectivity.READY

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = f"{self._prefix}.{next(self._ids)}"
        if self._stopping or len(self._tasks) >= self.config.max_connections:
            why = "shutting down" if self._stopping else f"{len(self._tasks)} connections open"
            self.metrics.connections_refused.labels("shutdown" if self._stopping else "limit").inc()
            log.warning("conn=%s: refused: %s (the MTA applies its default action)", conn_id, why)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.metrics.connections.inc()
        self.metrics.connections_open.inc()
        try:
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
        if self.config.listen.kind is ListenKind.UNIX:
            path = Path(self.config.listen.path)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_ino == self._socket_inode:  # not a later instance's socket
                    path.unlink()
        log.info("stopped")


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    bridge = Bridge(config)
    await bridge.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: stopping")
    await bridge.stop()


async def _in_use(path: Path) -> bool:
    """Whether a process accepts connections on this unix socket."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    writer.close()
    return True


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
