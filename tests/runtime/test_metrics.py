"""The HTTP endpoint: /metrics counts what happened to messages and why, /readyz follows the
policy, /healthz the process. Metrics are scraped after scripted runs, never timed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from milter_bridge.protocol import replies as r
from milter_bridge.server.bridge import Bridge
from milter_bridge.session import Stage
from milter_bridge.v1 import policy_pb2 as pb
from milter_policy.server import PolicyServer
from tests.runtime.policy import verdict
from tests.runtime.stack import Stack, running
from tests.runtime.stack import test_config as bridge_config
from tests.runtime.test_failures import CONNECT_AND_EOM, eom_answer, one_message
from tests.runtime.test_tls import accepting, message_through

METRICS = "127.0.0.1:0"  # port 0: the bridge reports the port it got
Decide = Callable[[pb.ProcessRequest], Awaitable[list[pb.ProcessResponse]]]


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    raw = await reader.read()  # HTTP/1.0: the server closes after the body
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def samples(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = await get(stack.bridge.metrics_port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get(("milter_bridge_" + name, frozenset(labels.items())), 0.0)


def eom_action(action: int) -> Decide:
    async def decide(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "end_of_message":
            return [verdict(request, action)]
        return [verdict(request)]

    return decide


async def test_health_endpoints_follow_the_policy() -> None:
    async with running(CONNECT_AND_EOM, metrics_listen=METRICS) as stack:
        port = stack.bridge.metrics_port
        assert port != 0
        assert await get(port, "/healthz") == (200, "ok\n")
        assert await get(port, "/readyz") == (200, "ready\n")
        assert (await get(port, "/nothing"))[0] == 404
        assert value(await samples(stack), "policy_ready") == 1
    async with running(
        CONNECT_AND_EOM, start_policy=False, describe_wait=0.05, metrics_listen=METRICS
    ) as stack:
        port = stack.bridge.metrics_port
        # The process lives, but without a policy it cannot filter: not ready.
        assert await get(port, "/healthz") == (200, "ok\n")
        assert await get(port, "/readyz") == (503, "not ready\n")
        assert value(await samples(stack), "policy_ready") == 0


async def test_messages_decisions_and_failures_are_counted() -> None:
    deadlines = dict.fromkeys(Stage, 5.0)
    deadlines[Stage.EOM] = 0.3
    release = asyncio.Event()

    async def slow(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "end_of_message":
            await release.wait()
        return [verdict(request)]

    async def wrong_sequence(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        return [pb.ProcessResponse(sequence=request.sequence + 7, verdict=pb.Verdict())]

    quarantine = eom_answer(modifications=[pb.Modification(quarantine=pb.Quarantine(reason="x"))])
    async with running(
        CONNECT_AND_EOM, deadlines=deadlines, progress_interval=0.05, metrics_listen=METRICS
    ) as stack:
        before = await samples(stack)
        assert value(before, "messages_total", verdict="accept") == 0

        runs: list[tuple[Decide | object, tuple[list[r.MilterReply], list[r.MilterReply]]]] = [
            (eom_action(pb.ACTION_ACCEPT), ([r.Continue()], [r.Accept()])),
            (eom_action(pb.ACTION_ACCEPT), ([r.Continue()], [r.Accept()])),
            (eom_action(pb.ACTION_REJECT), ([r.Continue()], [r.Reject()])),
            (quarantine, ([r.Continue()], [r.TempFail()])),
            (wrong_sequence, ([r.TempFail()], [])),
        ]
        for decide, expected in runs:
            stack.policy.decide = decide  # type: ignore[assignment]
            assert await one_message(stack) == expected
        stack.policy.decide = slow
        _connect, eom = await one_message(stack)
        assert eom[-1] == r.TempFail()
        progress = len(eom) - 1
        assert progress >= 1
        release.set()
        stack.policy.refuse_streams = True
        assert await one_message(stack) == ([r.TempFail()], [])

        found = await samples(stack)
        assert value(found, "messages_total", verdict="accept") == 2
        assert value(found, "messages_total", verdict="reject") == 1
        # Failure actions end messages too, and are counted by cause apart from decisions.
        assert value(found, "messages_total", verdict="tempfail") == 2
        assert value(found, "failure_actions_total", stage="end_of_message", cause="timeout") == 1
        eom_refused = {"stage": "end_of_message", "cause": "refused_modification"}
        assert value(found, "failure_actions_total", **eom_refused) == 1
        assert value(found, "failure_actions_total", stage="connect", cause="invalid_reply") == 1
        assert value(found, "failure_actions_total", stage="connect", cause="refused_stream") == 1
        assert value(found, "policy_decisions_total", stage="connect", action="continue") == 5
        assert value(found, "policy_decisions_total", stage="end_of_message", action="accept") == 2
        assert value(found, "policy_decisions_total", stage="end_of_message", action="reject") == 1
        assert value(found, "progress_sent_total") == progress
        assert value(found, "connections_total") == len(runs) + 2
        assert value(found, "policy_latency_seconds_count", stage="connect") == 5
        assert value(found, "message_duration_seconds_count") == 5
        assert value(found, "upstream_streams_total") >= len(runs) + 1


async def test_sessions_and_streams_are_counted_per_replica() -> None:
    replicas = [PolicyServer(accepting(), "127.0.0.1:0") for _ in range(3)]
    for server in replicas:
        await server.start()
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in replicas)
    bridge = Bridge(bridge_config(target, metrics_listen=METRICS))
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(5.0) is not None
        for _ in range(9):
            assert await message_through(bridge) == [r.Continue(), r.Accept()]
        status, body = await get(bridge.metrics_port, "/metrics")
        assert status == 200
        per_replica: dict[str, dict[str, float]] = {"sessions": {}, "streams": {}}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                for kind, counts in per_replica.items():
                    if s.name == f"milter_bridge_upstream_replica_{kind}_total":
                        counts[s.labels["replica"]] = s.value
    finally:
        await bridge.stop()
        for server in replicas:
            await server.stop(0)
    names = {f"{socket.gethostname()}:{s.port}" for s in replicas}
    sessions, streams = per_replica["sessions"], per_replica["streams"]
    # Each named by its milter-policy-replica header.
    assert set(sessions) <= names, sessions
    assert set(streams) <= names, streams
    assert sum(sessions.values()) == 9
    assert len(sessions) >= 2, sessions  # spread over the replicas
    # The SDK policy offers shared streams: the default --policy-streams 4 carry them.
    assert sum(streams.values()) == 4
