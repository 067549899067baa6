"""The gRPC channel to the policy services.

Targets as grpc accepts them: ``host:port``, ``dns:///name:port`` (every
address the name resolves to), ``ipv4:127.0.0.1:5001,127.0.0.1:5002``,
``unix:/path``. Calls are spread over the addresses with round_robin; a
stream stays on the replica it started on.
"""

from __future__ import annotations

import json

import grpc
import grpc.aio

from milter_bridge.v1 import policy_pb2_grpc

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

OPTIONS: list[tuple[str, object]] = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.lb_policy_name", "round_robin"),
    # An end-of-message event may carry a buffered body of several MiB.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Notice a dead policy host between messages, not only when a call times out.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect to a restarted policy quickly (grpc's default starts at 1 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def make_channel(target: str) -> grpc.aio.Channel:
    """Create inside the running event loop (grpc.aio binds the channel to it)."""
    return grpc.aio.insecure_channel(target, options=OPTIONS)


def make_stub(channel: grpc.aio.Channel) -> policy_pb2_grpc.PolicyServiceAsyncStub:
    # The .pyi types this as the async stub; at run time it is the one stub class.
    return policy_pb2_grpc.PolicyServiceStub(channel)
