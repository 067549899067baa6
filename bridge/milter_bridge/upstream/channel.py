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

from milter_bridge.upstream.security import Tls
from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc

MAX_ANSWER_SIZE = 64 << 20
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

OPTIONS: list[tuple[str, object]] = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.lb_policy_name", "round_robin"),
    # An end-of-message event may carry a buffered body of several MiB.
    ("grpc.max_send_message_length", -1),
    # A policy's answer may replace the body; anything larger is a broken policy.
    ("grpc.max_receive_message_length", MAX_ANSWER_SIZE),
    # Notice a dead policy host during long streams. Within what a default grpc
    # server accepts (one ping per 5 minutes, none without calls), or it sends
    # GOAWAY too_many_pings and the streams die.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Reconnect to a restarted policy quickly (grpc's default starts at 1 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def make_channel(target: str, tls: Tls | None = None) -> grpc.aio.Channel:
    """Create inside the running event loop (grpc.aio binds the channel to it)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=OPTIONS)
    return grpc.aio.secure_channel(target, tls.credentials(), options=OPTIONS + tls.options())


def make_stub(channel: grpc.aio.Channel) -> policy_pb2_grpc.PolicyServiceAsyncStub:
    # The .pyi types this as the async stub; at run time it is the one stub class.
    return policy_pb2_grpc.PolicyServiceStub(channel)


# Process stream's calls, with responses as raw bytes: the bridge parses them
# itself, so that a reply that is not a ProcessResponse is a failure it handles
# (the stage's failure action, cause invalid_reply) instead of grpc's
# "Exception deserializing message!" traceback and a read() that yields None.
ProcessMethod = grpc.aio.StreamStreamMultiCallable[pb.ProcessRequest, bytes]
PROCESS_METHOD = "/{}/Process".format(pb.DESCRIPTOR.services_by_name["PolicyService"].full_name)


def process_method(channel: grpc.aio.Channel) -> ProcessMethod:
    return channel.stream_stream(
        PROCESS_METHOD,
        request_serializer=pb.ProcessRequest.SerializeToString,
        response_deserializer=None,
    )
