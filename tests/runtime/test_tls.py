"""TLS, mutual TLS and a bearer token between the bridge and an SDK policy, with certificates
made at test time (trustme). A bridge the policy refuses, or that refuses the policy, gets
no capabilities and applies the connect-stage failure action; the right one gets the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from milter_bridge.protocol import replies as r
from milter_bridge.server.bridge import Bridge
from milter_policy import Context, Policy
from milter_policy.security import ServerTls
from milter_policy.server import PolicyServer
from tests.runtime.mta_client import MtaClient
from tests.runtime.stack import test_config as bridge_config
from tests.session import harness as h

SERVER_NAME = "policy.mail.svc.cluster.local"


@dataclass
class Pki:
    """PEM files: the policy's CA and certificate, the bridges' CA and client certificate,
    a CA nobody uses, a client certificate from it, and two tokens."""

    ca: str
    server_cert: str
    server_key: str
    client_ca: str
    client_cert: str
    client_key: str
    stranger_ca: str
    stranger_cert: str
    stranger_key: str
    token: str
    wrong_token: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def write(name: str, data: bytes) -> str:
        (d / name).write_bytes(data)
        return str(d / name)

    ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", SERVER_NAME)
    client = client_ca.issue_cert("bridge.mail.svc.cluster.local")
    other = stranger.issue_cert("bridge.mail.svc.cluster.local")
    return Pki(
        ca=write("ca.pem", ca.cert_pem.bytes()),
        server_cert=write("server.pem", server.cert_chain_pems[0].bytes()),
        server_key=write("server.key", server.private_key_pem.bytes()),
        client_ca=write("client-ca.pem", client_ca.cert_pem.bytes()),
        client_cert=write("client.pem", client.cert_chain_pems[0].bytes()),
        client_key=write("client.key", client.private_key_pem.bytes()),
        stranger_ca=write("stranger-ca.pem", stranger.cert_pem.bytes()),
        stranger_cert=write("stranger.pem", other.cert_chain_pems[0].bytes()),
        stranger_key=write("stranger.key", other.private_key_pem.bytes()),
        token=write("token", b"s3cret-token\n"),
        wrong_token=write("wrong-token", b"not-the-token\n"),
    )


def accepting() -> Policy:
    policy = Policy("tls")

    @policy.connect
    def hello(ctx: Context) -> None:
        """Continues: the policy, not the bridge, answers CONNECT."""

    @policy.end_of_message
    def accept(ctx: Context) -> None:
        ctx.accept()

    return policy


@pytest.fixture
async def servers() -> AsyncIterator[list[PolicyServer]]:
    started: list[PolicyServer] = []
    yield started
    for server in started:
        await server.stop(0)


async def serve(started: list[PolicyServer], **security: object) -> str:
    server = PolicyServer(accepting(), "127.0.0.1:0", **security)  # type: ignore[arg-type]
    started.append(server)
    await server.start()
    return f"127.0.0.1:{server.port}"


async def message_through(bridge: Bridge) -> list[r.MilterReply]:
    """The replies to CONNECT and, if it continued, to end of message."""
    mta = await MtaClient.connect(bridge.port)
    try:
        await mta.negotiate()
        replies = await mta.command(*h.connect())
        if replies == [r.Continue()]:
            await mta.send(*h.mail(), *h.rcpt())  # no reply: the policy only observes them
            replies += await mta.command(*h.eom())
        return replies
    finally:
        await mta.close()


async def one_message(target: str, **bridge_settings: object) -> list[r.MilterReply]:
    """The replies through a new bridge with these settings."""
    bridge = Bridge(bridge_config(target, describe_wait=1.0, **bridge_settings))
    await bridge.start()
    try:
        return await message_through(bridge)
    finally:
        await bridge.stop()


ANSWERED = [r.Continue(), r.Accept()]  # capabilities fetched; the policy accepted
REFUSED = [r.TempFail()]  # no capabilities: the connect-stage failure action


async def test_tls(pki: Pki, servers: list[PolicyServer]) -> None:
    target = await serve(servers, tls=ServerTls.from_files(pki.server_cert, pki.server_key))
    assert await one_message(target, upstream_ca=pki.ca) == ANSWERED
    # The certificate's DNS name instead of the address dialled (dns:/// targets in Kubernetes).
    named = {"upstream_ca": pki.ca, "upstream_server_name": SERVER_NAME}
    assert await one_message(target, **named) == ANSWERED


async def test_tls_refusals(
    pki: Pki, servers: list[PolicyServer], caplog: pytest.LogCaptureFixture
) -> None:
    target = await serve(servers, tls=ServerTls.from_files(pki.server_cert, pki.server_key))
    # A bridge trusting another CA refuses the policy's certificate.
    assert await one_message(target, upstream_ca=pki.stranger_ca) == REFUSED
    assert "Describe failed: UNAVAILABLE" in caplog.text
    # A certificate valid for another name.
    wrong_name = {"upstream_ca": pki.ca, "upstream_server_name": "other.example"}
    assert await one_message(target, **wrong_name) == REFUSED
    # Plaintext to a TLS port.
    assert await one_message(target) == REFUSED
    assert await one_message(target, upstream_ca=pki.ca) == ANSWERED  # control


async def test_mutual_tls(pki: Pki, servers: list[PolicyServer]) -> None:
    tls = ServerTls.from_files(pki.server_cert, pki.server_key, client_ca=pki.client_ca)
    target = await serve(servers, tls=tls)
    client = {"upstream_ca": pki.ca, "upstream_cert": pki.client_cert}
    assert await one_message(target, **client, upstream_key=pki.client_key) == ANSWERED
    # No client certificate, or one from a CA the policy does not trust: refused.
    assert await one_message(target, upstream_ca=pki.ca) == REFUSED
    stranger = {"upstream_cert": pki.stranger_cert, "upstream_key": pki.stranger_key}
    assert await one_message(target, upstream_ca=pki.ca, **stranger) == REFUSED


async def test_bearer_token(
    pki: Pki, servers: list[PolicyServer], caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTls.from_files(pki.server_cert, pki.server_key)
    target = await serve(servers, tls=tls, token_file=pki.token)
    assert await one_message(target, upstream_ca=pki.ca, upstream_token_file=pki.token) == ANSWERED
    wrong = await one_message(target, upstream_ca=pki.ca, upstream_token_file=pki.wrong_token)
    assert wrong == REFUSED
    assert "Describe failed: UNAUTHENTICATED" in caplog.text
    assert await one_message(target, upstream_ca=pki.ca) == REFUSED  # no token at all
    # Health stays open without a token: Kubernetes' gRPC probes send none.
    credentials = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes())
    async with grpc.aio.secure_channel(target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("policy_streams", [0, 4])
async def test_token_rotation_needs_no_restart(
    servers: list[PolicyServer], tmp_path: Path, policy_streams: int
) -> None:
    """The token file is read for each new stream: a Process stream per session, or a
    shared stream (here each lives 1 µs, so that each session gets a new one; a shared
    stream already open keeps the token it was opened with until its lifetime ends)."""
    server_token, bridge_token = tmp_path / "server-token", tmp_path / "bridge-token"
    server_token.write_text("first\n")
    bridge_token.write_text("first\n")
    target = await serve(servers, token_file=str(server_token))  # a token over plaintext works too
    config = bridge_config(
        target,
        upstream_token_file=str(bridge_token),
        policy_streams=policy_streams,
        policy_stream_lifetime=1e-6,
    )
    bridge = Bridge(config)
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(5.0) is not None
        assert await message_through(bridge) == ANSWERED
        # The policy rotates first: the bridge's next stream is refused (connect's failure action).
        server_token.write_text("second\n")
        assert await message_through(bridge) == [r.TempFail()]
        # The bridge's file follows: both read their files again, no restart.
        bridge_token.write_text("second\n")
        assert await message_through(bridge) == ANSWERED
    finally:
        await bridge.stop()
