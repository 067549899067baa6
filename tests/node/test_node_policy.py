"""The Node.js example policy (examples/node/policy.js) as its own process behind the real bridge.

It proves the "any gRPC language" claim: a policy written with @grpc/grpc-js
and @grpc/proto-loader, loading proto/milter_bridge/v1/policy.proto directly,
answers the bridge exactly as a Python policy would. The MTA client sends only
what the negotiation asked for: NR* commands without waiting, the rest waiting
for their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ProtocolFlag
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc
from tests.prerequisites import require
from tests.runtime.mta_client import MtaClient
from tests.session import harness as h

P = ProtocolFlag
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
FOOTER = b"-- \r\nChecked by the milter-bridge Node.js example policy.\r\n"
BLOCKED = b"<blocked@example.test>"


def require_node() -> None:
    """Skip (CI=true: fail) without node, npm and the example's installed packages."""
    require(commands=("node", "npm"))
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        reason = "examples/node/node_modules missing: run `cd examples/node && npm ci`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing prerequisite in CI: {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def node_policy() -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``node examples/node/policy.js 127.0.0.1:<port>``, once it printed its readiness line."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "node",
        str(EXAMPLE / "policy.js"),
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        if b"listening on" not in line:
            rest = await process.stdout.read()
            pytest.fail(f"node policy did not start: {(line + rest).decode(errors='replace')}")
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def bridge_to(port: int) -> AsyncIterator[Bridge]:
    listen = Listen(ListenKind.INET, host="127.0.0.1", port=0)
    bridge = Bridge(Config(listen=listen, upstream=f"127.0.0.1:{port}"))
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        yield bridge
    finally:
        await bridge.stop()


async def test_node_policy_describes_itself() -> None:
    require_node()
    async with node_policy() as (process, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            described = await stub.Describe(pb.DescribeRequest(bridge_version="test"), timeout=10)
        caps = described.capabilities
        assert described.fingerprint.startswith("node-example-")
        assert caps.events.rcpt_to == pb.EVENT_MODE_DECIDE
        assert caps.events.end_of_message == pb.EVENT_MODE_DECIDE
        skipped = [f.name for f in pb.EventModes.DESCRIPTOR.fields]
        skipped = [n for n in skipped if n not in ("rcpt_to", "end_of_message")]
        assert [getattr(caps.events, n) for n in skipped] == [pb.EVENT_MODE_SKIP] * len(skipped)
        assert caps.header_delivery == pb.HEADER_DELIVERY_EACH
        assert caps.body_delivery == pb.BODY_DELIVERY_BUFFERED
        assert caps.body_limit == 256 * 1024
        assert caps.end_of_message_content == pb.EndOfMessageContent(envelope=True, headers=True)
        assert caps.actions == pb.Actions(add_header=True, replace_body=True)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0


async def test_node_policy_through_the_bridge_and_sigterm() -> None:
    require_node()
    async with node_policy() as (process, port), bridge_to(port) as bridge:
        client = await MtaClient.connect(bridge.port)
        negotiated = await client.negotiate()
        # RCPT and end of message are answered; what end of message carries
        # (envelope, headers, body) is collected without the MTA waiting.
        for nr in (P.SMFIP_NR_CONN, P.SMFIP_NR_HELO, P.SMFIP_NR_MAIL, P.SMFIP_NR_HDR):
            assert negotiated.protocol & nr
        assert not negotiated.protocol & (P.SMFIP_NORCPT | P.SMFIP_NR_RCPT)
        assert not negotiated.protocol & P.SMFIP_NOBODY
        assert negotiated.protocol & P.SMFIP_NODATA
        assert negotiated.protocol & P.SMFIP_NOEOH
        assert negotiated.protocol & P.SMFIP_NOUNKNOWN
        body_nr = bool(negotiated.protocol & P.SMFIP_NR_BODY)

        async def body(data: bytes) -> None:
            if body_nr:
                await client.send(cmd.Body(data))
            else:
                assert await client.command(cmd.Body(data)) == [r.Continue()]

        await client.send(*h.connect(), *h.helo())
        # Two messages on one connection: the count is per message.
        for recipients, count in (
            ((BLOCKED, b"<rcpt@example.test>"), 1),
            ((b"<a@example.test>", b"<b@example.test>"), 2),
        ):
            original = b"first line\r\nsecond line for %d\r\n" % count
            await client.send(*h.mail())
            for recipient in recipients:
                answer = await client.command(*h.rcpt(recipient))
                if recipient == BLOCKED:
                    assert answer == [r.ReplyCode(b"550 5.7.1 blocked by node policy")]
                else:
                    assert answer == [r.Continue()]
            await client.send(
                cmd.Header(b"From", b"sender@example.test"), cmd.Header(b"Subject", b"hi")
            )
            await body(original)
            assert await client.command(*h.eom()) == [
                r.AddHeader(b"X-Node-Policy", b"seen %d recipients" % count),
                r.ReplaceBody(original + FOOTER),
                r.Continue(),
            ]
        await client.send(cmd.Quit())
        await client.close()

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
        assert process.stdout is not None
        output = (await process.stdout.read()).decode(errors="replace")
        assert "node policy stopped" in output, output
