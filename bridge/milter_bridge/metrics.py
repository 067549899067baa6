"""Prometheus metrics of one bridge process, and the HTTP endpoint serving them with health.

    GET /metrics   Prometheus text format
    GET /healthz   200 while the process serves (liveness)
    GET /readyz    200 when the policy's capabilities are known and its gRPC
                   health is SERVING (or it has no health service), else 503

Failure actions (the policy could not decide) are counted apart from the
policy's own decisions, by cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes

# Why a failure action was applied (failure_actions_total{cause}).
CAUSES = (
    # no capabilities known; the channel not connected when a request was due;
    # UNAVAILABLE (a replica gone) not recovered by reopening the stream
    "unreachable",
    "timeout",  # no answer, or the request not taken, within the stage's deadline
    "stream_error",  # the stream broke or ended before the answer (upstream/status.py)
    "refused_stream",  # the policy refused the stream (FAILED_PRECONDITION)
    # an answer the session refused (wrong stage, sequence, syntax), bytes that are
    # not a ProcessResponse, or more unread answers than a stream may hold
    "invalid_reply",
    "refused_modification",  # a modification not negotiated or not valid
)
log = logging.getLogger("milter_bridge")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class Metrics:
    """Every metric of the bridge, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "milter_bridge_"
        self.connections_open = Gauge(
            p + "connections_open", "MTA connections open", registry=r, multiprocess_mode="livesum"
        )
        self.worker_connections = Gauge(
            p + "worker_connections",
            "MTA connections accepted by the process since it started; with --workers N one"
            " series per live worker, labelled by its pid",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.connections = Counter(p + "connections", "MTA connections accepted", registry=r)
        self.connections_refused = Counter(
            p + "connections_refused", "MTA connections closed at once", ["reason"], registry=r
        )
        self.messages = Counter(
            p + "messages",
            "Messages ended at end of message, by final reply",
            ["verdict"],
            registry=r,
        )
        self.decisions = Counter(
            p + "policy_decisions",
            "Policy answers by stage and action",
            ["stage", "action"],
            registry=r,
        )
        self.events_sent = Counter(
            p + "events_sent", "Events sent to the policy", ["event"], registry=r
        )
        self.policy_latency = Histogram(
            p + "policy_latency_seconds",
            "From reading the MTA's command to the policy's answer (opening the stream included)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.message_duration = Histogram(
            p + "message_duration_seconds",
            "From the first MTA command after the connection or the last end of message "
            "to the answer at end of message",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failure_actions = Counter(
            p + "failure_actions",
            "Failure actions applied because the policy could not decide",
            ["stage", "cause"],
            registry=r,
        )
        self.progress_sent = Counter(
            p + "progress_sent", "SMFIR_PROGRESS keep-alives sent", registry=r
        )
        self.streams = Counter(p + "upstream_streams", "Policy streams opened", registry=r)
        self.stream_retries = Counter(
            p + "upstream_stream_retries", "Streams opened again after UNAVAILABLE", registry=r
        )
        self.replica_streams = Counter(
            p + "upstream_replica_streams",
            "Policy streams by the replica that took them (its milter-policy-replica header)",
            ["replica"],
            registry=r,
        )
        self.replica_sessions = Counter(
            p + "upstream_replica_sessions",
            "SMTP sessions by the replica that took them (a Process stream, or a session on a"
            " shared stream; replays counted again)",
            ["replica"],
            registry=r,
        )
        self.policy_ready = Gauge(
            p + "policy_ready",
            "1 when capabilities are known and the policy is healthy (with --workers N:"
            " in every worker)",
            registry=r,
            multiprocess_mode="livemin",
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpEndpoint:
    """A minimal HTTP/1.0 server for the three paths (no dependency beyond asyncio)."""

    def __init__(self, render: Callable[[], bytes], ready: Callable[[], bool]) -> None:
        self.render = render
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        if sock is None:
            self._server = await asyncio.start_server(self._handle, host, port)
        else:
            self._server = await asyncio.start_server(self._handle, sock=sock)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def _metrics(self) -> bytes:
        """The rendered metrics, or nothing (a 500) when they cannot be read."""
        try:
            return self.render()
        except Exception:  # a metrics file unreadable: the scrape fails, not the endpoint
            log.exception("/metrics failed")
            return b""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else ""
            if path == "/metrics":
                status, body, kind = 200, self._metrics(), CONTENT_TYPE_PLAIN_0_0_4
            elif path == "/healthz":
                status, body, kind = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ok = self.ready()
                status, body, kind = (
                    (200, b"ready\n", "text/plain") if ok else (503, b"not ready\n", "text/plain")
                )
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            if not body:
                status, body, kind = 500, b"metrics unavailable, see the log\n", "text/plain"
            reason = {
                200: "OK",
                404: "Not Found",
                500: "Internal Server Error",
                503: "Service Unavailable",
            }[status]
            head = f"HTTP/1.0 {status} {reason}\r\nContent-Type: {kind}\r\n"
            head += f"Content-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
