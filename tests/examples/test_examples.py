"""The example policies through the real bridge, and each example as its own process.

Each policy is served on a port (PolicyServer) with the bridge in front and an
MTA client on the bridge's socket. The client sends only what the negotiation
asked for, as a real MTA does: commands the bridge said NO* to are left out,
NR* ones are sent without waiting, and the rest wait for their answer. The
assertions are the exact milter replies the MTA receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from examples import (
    content_filter,
    disclaimer,
    envelope_rewriter,
    header_stamper,
    recipient_allowlist,
)
from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.constants import ProtocolFlag
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc
from milter_policy import Policy, PolicyServer
from tests.runtime.mta_client import MtaClient
from tests.session import harness as h

P = ProtocolFlag
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "header_stamper": header_stamper.policy,
    "recipient_allowlist": recipient_allowlist.policy,
    "content_filter": content_filter.policy,
    "disclaimer": disclaimer.policy,
    "envelope_rewriter": envelope_rewriter.policy,
}

# Per command: the flag that leaves it out, and the flag that makes it unanswered.
FLAGS: dict[type[MtaCommand], tuple[ProtocolFlag, ProtocolFlag]] = {
    cmd.Connect: (P.SMFIP_NOCONNECT, P.SMFIP_NR_CONN),
    cmd.Helo: (P.SMFIP_NOHELO, P.SMFIP_NR_HELO),
    cmd.Mail: (P.SMFIP_NOMAIL, P.SMFIP_NR_MAIL),
    cmd.Rcpt: (P.SMFIP_NORCPT, P.SMFIP_NR_RCPT),
    cmd.Data: (P.SMFIP_NODATA, P.SMFIP_NR_DATA),
    cmd.Header: (P.SMFIP_NOHDRS, P.SMFIP_NR_HDR),
    cmd.EndOfHeaders: (P.SMFIP_NOEOH, P.SMFIP_NR_EOH),
    cmd.Body: (P.SMFIP_NOBODY, P.SMFIP_NR_BODY),
    cmd.Unknown: (P.SMFIP_NOUNKNOWN, P.SMFIP_NR_UNKN),
}
NEVER_ANSWERED = (cmd.DefineMacro, cmd.Abort, cmd.Quit)

# Every step but end of message left out: the MTA sends only end of message.
ONLY_EOM = (
    P.SMFIP_NOCONNECT
    | P.SMFIP_NOHELO
    | P.SMFIP_NOMAIL
    | P.SMFIP_NORCPT
    | P.SMFIP_NODATA
    | P.SMFIP_NOHDRS
    | P.SMFIP_NOEOH
    | P.SMFIP_NOBODY
    | P.SMFIP_NOUNKNOWN
)
# Headers and body sent without waiting; the rest but end of message left out.
CONTENT_AT_EOM = (
    P.SMFIP_NOCONNECT
    | P.SMFIP_NOHELO
    | P.SMFIP_NOMAIL
    | P.SMFIP_NORCPT
    | P.SMFIP_NODATA
    | P.SMFIP_NR_HDR
    | P.SMFIP_NOEOH
    | P.SMFIP_NR_BODY
    | P.SMFIP_NOUNKNOWN
)


class Mta:
    """An MTA client that sends only what the negotiation asked for."""

    def __init__(self, client: MtaClient, negotiated: r.OptionNegotiationReply) -> None:
        self.client = client
        self.negotiated = negotiated

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[Mta]:
        """A connection to the bridge on ``port``, option negotiation done."""
        client = await MtaClient.connect(port)
        try:
            yield cls(client, await client.negotiate())
        finally:
            await client.close()

    async def deliver(self, commands: Sequence[MtaCommand]) -> list[list[r.MilterReply]]:
        """Send the commands; the answers to those the MTA waits for, in order."""
        answers: list[list[r.MilterReply]] = []
        for command in commands:
            leave_out, no_reply = FLAGS.get(type(command), (P(0), P(0)))
            if self.negotiated.protocol & leave_out:
                continue
            if isinstance(command, NEVER_ANSWERED) or self.negotiated.protocol & no_reply:
                await self.client.send(command)
            else:
                answers.append(await self.client.command(command))
        return answers


def message(
    sender: bytes = b"<sender@example.test>",
    recipients: Sequence[bytes] = (b"<rcpt@example.test>",),
    headers: Sequence[tuple[bytes, bytes]] = ((b"From", b"sender@example.test"),),
    body: bytes = b"body line\r\n",
    eom_macros: Sequence[tuple[bytes, bytes]] = ((b"i", b"QID1"),),
) -> list[MtaCommand]:
    """A whole SMTP session's commands for one message, with macros as Postfix sends them."""
    commands = [*h.connect(), *h.helo(), *h.mail(sender)]
    for recipient in recipients:
        commands += h.rcpt(recipient)
    commands += [cmd.DefineMacro(b"T", ((b"i", b"QID1"),)), cmd.Data()]
    commands += [cmd.Header(name, value) for name, value in headers]
    commands += [cmd.DefineMacro(b"N", ()), cmd.EndOfHeaders()]
    commands += [cmd.Body(body[i : i + 65535]) for i in range(0, len(body), 65535)]
    commands += [cmd.DefineMacro(b"E", tuple(eom_macros)), cmd.EndOfMessage()]
    return commands


@contextlib.asynccontextmanager
async def bridge_to(upstream: str) -> AsyncIterator[Bridge]:
    """The real bridge on a TCP port in front of the policy service at ``upstream``."""
    listen = Listen(ListenKind.INET, host="127.0.0.1", port=0)
    bridge = Bridge(Config(listen=listen, upstream=upstream))
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        yield bridge
    finally:
        await bridge.stop()


@contextlib.asynccontextmanager
async def bridged(policy: Policy) -> AsyncIterator[Bridge]:
    server = PolicyServer(policy, "127.0.0.1:0")
    await server.start()
    try:
        async with bridge_to(f"127.0.0.1:{server.port}") as bridge:
            yield bridge
    finally:
        await server.stop(1.0)


# -- header_stamper -----------------------------------------------------------------


async def test_header_stamper_stamps_every_message_in_one_round_trip() -> None:
    stamped = [r.AddHeader(b"X-Filtered-By", b"header-stamper (queue id QID1)"), r.Continue()]
    async with bridged(header_stamper.policy) as bridge, Mta.connect(bridge.port) as mta:
        assert mta.negotiated.protocol & ONLY_EOM == ONLY_EOM  # nothing but end of message
        # Two messages on one connection: each gets its header, and end of
        # message is the only command the MTA sends and waits for.
        assert await mta.deliver(message()) == [stamped]
        assert await mta.deliver(message(headers=(), body=b"")) == [stamped]


async def test_header_stamper_without_a_queue_id_names_the_policy_only() -> None:
    async with bridged(header_stamper.policy) as bridge, Mta.connect(bridge.port) as mta:
        assert await mta.deliver(message(eom_macros=())) == [
            [r.AddHeader(b"X-Filtered-By", b"header-stamper"), r.Continue()]
        ]


# -- recipient_allowlist --------------------------------------------------------------

UNKNOWN_MAILBOX = [r.ReplyCode(b"550 5.1.1 mailbox unavailable")]


async def test_recipient_allowlist_refuses_unknown_recipients_at_rcpt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The module's default list (independent of $ALLOWED_RECIPIENTS in this environment).
    default = recipient_allowlist.parse_allowlist(recipient_allowlist.DEFAULT_ALLOWED)
    monkeypatch.setattr(recipient_allowlist, "ALLOWED", default)
    async with bridged(recipient_allowlist.policy) as bridge, Mta.connect(bridge.port) as mta:
        # RCPT is sent and answered; the message's other steps are left out.
        assert not mta.negotiated.protocol & (P.SMFIP_NORCPT | P.SMFIP_NR_RCPT)
        commands = message(
            recipients=(
                b"<stranger@elsewhere.test>",  # unknown domain
                b"<bob@example.org>",  # allowed domain
                b"<Alice@EXAMPLE.ORG>",  # case does not matter
                b"<postmaster@example.net>",  # allowed address
                b"<bob@example.net>",  # same domain, not allowed
                b"<bob@sub.example.org>",  # subdomains are not included
            )
        )
        assert await mta.deliver(commands) == [
            UNKNOWN_MAILBOX,
            [r.Continue()],
            [r.Continue()],
            [r.Continue()],
            UNKNOWN_MAILBOX,
            UNKNOWN_MAILBOX,
            [r.Continue()],  # end of message: the accepted recipients get the message
        ]


# -- content_filter -------------------------------------------------------------------

CONTENT_REJECTED = [r.ReplyCode(b"554 5.7.1 message content rejected")]


def quarantined(keyword: bytes) -> list[r.MilterReply]:
    return [r.Quarantine(b"content-filter: '" + keyword + b"'"), r.Continue()]


@pytest.mark.parametrize(
    ("subject", "body", "answer"),
    [
        (b"hello", b"nothing to see\r\n", [r.Continue()]),
        (b"You are a LOTTERY winner!", b"hi\r\n", CONTENT_REJECTED),
        (b"You are a lottery\n\twinner", b"hi\r\n", CONTENT_REJECTED),  # a folded Subject
        (b"hello", b"Dear lottery\r\nWinner, pay the\r\n", CONTENT_REJECTED),  # across lines
        (b"hello", b"x" * 70000 + b" wire transfer fee\r\n", CONTENT_REJECTED),  # 2nd chunk
        (b"Password reset", b"hi\r\n", quarantined(b"password reset")),
        (b"hi", b"your invoice overdue\r\n", quarantined(b"invoice overdue")),
        (b"password reset", b"lottery winner\r\n", CONTENT_REJECTED),  # reject wins
    ],
)
async def test_content_filter_rejects_or_quarantines_on_keywords(
    subject: bytes, body: bytes, answer: list[r.MilterReply]
) -> None:
    headers = ((b"From", b"sender@example.test"), (b"Subject", subject))
    async with bridged(content_filter.policy) as bridge, Mta.connect(bridge.port) as mta:
        # Headers and body are sent without waiting; only end of message is answered.
        assert mta.negotiated.protocol & CONTENT_AT_EOM == CONTENT_AT_EOM
        assert await mta.deliver(message(headers=headers, body=body)) == [answer]


async def test_content_filter_searches_only_the_first_body_limit_bytes() -> None:
    body = b"x" * content_filter.BODY_LIMIT + b" lottery winner\r\n"
    async with bridged(content_filter.policy) as bridge, Mta.connect(bridge.port) as mta:
        assert await mta.deliver(message(body=body)) == [[r.Continue()]]


async def test_content_filter_judges_each_message_on_its_own_headers() -> None:
    async with bridged(content_filter.policy) as bridge, Mta.connect(bridge.port) as mta:
        spam = message(headers=((b"Subject", b"lottery winner"),))
        assert await mta.deliver(spam) == [CONTENT_REJECTED]
        # The next message on the same connection has no headers at all.
        assert await mta.deliver(message(headers=())) == [[r.Continue()]]


# -- disclaimer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "new_body"),
    [
        ((), b"Hello\r\n", b"Hello\r\n" + disclaimer.DISCLAIMER),
        ((), b"no line end", b"no line end\r\n" + disclaimer.DISCLAIMER),
        ((), b"", disclaimer.DISCLAIMER),
        (
            ((b"Content-Type", b"text/plain; charset=utf-8"),),
            "Grüße\r\n".encode(),
            "Grüße\r\n".encode() + disclaimer.DISCLAIMER,
        ),
        (((b"Content-Type", b"text/html"),), b"<p>hi</p>\r\n", None),
        (((b"Content-Type", b"multipart/mixed; boundary=b"),), b"--b\r\n", None),
        (((b"Content-Transfer-Encoding", b"base64"),), b"aGk=\r\n", None),
        ((), b"x" * (disclaimer.BODY_LIMIT + 1), None),  # too long to be seen whole
    ],
)
async def test_disclaimer_appends_to_plain_text_bodies(
    headers: tuple[tuple[bytes, bytes], ...], body: bytes, new_body: bytes | None
) -> None:
    replace = [] if new_body is None else [r.ReplaceBody(new_body)]
    async with bridged(disclaimer.policy) as bridge, Mta.connect(bridge.port) as mta:
        assert mta.negotiated.protocol & CONTENT_AT_EOM == CONTENT_AT_EOM
        answers = await mta.deliver(message(headers=headers, body=body))
        assert answers == [[*replace, r.Continue()]]


# -- envelope_rewriter --------------------------------------------------------------


async def test_envelope_rewriter_changes_sender_adds_archive_drops_noreply() -> None:
    envelope = P.SMFIP_NR_CONN | P.SMFIP_NR_HELO | P.SMFIP_NR_MAIL | P.SMFIP_NR_RCPT
    no_content = P.SMFIP_NOHDRS | P.SMFIP_NOBODY  # only the envelope is collected
    async with bridged(envelope_rewriter.policy) as bridge, Mta.connect(bridge.port) as mta:
        assert mta.negotiated.protocol & (envelope | no_content) == envelope | no_content
        commands = message(
            sender=b"<app@internal.example.org>",
            recipients=(b"<bob@example.net>", b"<NoReply@example.com>", b"<no-reply@x.test>"),
        )
        assert await mta.deliver(commands) == [
            [
                r.ChangeSender(b"<bounces@example.org>", b"RET=HDRS"),
                r.AddRecipientWithArgs(b"<archive@example.org>", b"NOTIFY=NEVER"),
                r.DeleteRecipient(b"<NoReply@example.com>"),  # as the MTA sent it
                r.DeleteRecipient(b"<no-reply@x.test>"),
                r.Continue(),
            ]
        ]
        # The next message on the connection: an unmapped sender stays, and the
        # archive is not added twice.
        commands = message(recipients=(b"<bob@example.net>", b"<Archive@example.org>"))
        assert await mta.deliver(commands) == [[r.Continue()]]


# -- each example as its own process ------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def example_process(
    name: str, log: Path, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``python examples/<name>.py --listen 127.0.0.1:<port>``, once it answers health checks.

    ``env`` is added to this process's environment without $ALLOWED_RECIPIENTS."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    environment = {k: v for k, v in os.environ.items() if k != recipient_allowlist.ENV_VAR}
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / f"{name}.py"),
            "--listen",
            address,
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=environment | dict(env or {}),
        )
    try:
        async with asyncio.timeout(30):
            while True:  # readiness: the port accepts connections
                if process.returncode is not None:
                    pytest.fail(f"{name} exited with {process.returncode}: {log.read_text()}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                break
            async with grpc.aio.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="")
                response = await health.Check(request, wait_for_ready=True)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
        yield process, address
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def terminate(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        return await process.wait()


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_runs_as_a_process_and_stops_on_sigterm(name: str, tmp_path: Path) -> None:
    policy = EXAMPLES[name]
    log = tmp_path / f"{name}.log"
    async with example_process(name, log) as (process, address):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            described = await stub.Describe(pb.DescribeRequest(), timeout=10)
        # The process serves the very policy the module defines.
        assert described.fingerprint == policy.fingerprint
        assert described.capabilities == policy.capabilities()
        assert await terminate(process) == 0
    assert f"policy {policy.name!r} stopping" in log.read_text()


@pytest.mark.parametrize(
    ("args", "env", "allowed", "refused"),
    [
        # Neither: the module's default list.
        (
            (),
            {},
            [b"<bob@example.org>", b"<postmaster@example.net>"],
            [b"<bob@example.net>", b"<x@example.com>"],
        ),
        # The environment variable replaces the module's default list.
        (
            (),
            {"ALLOWED_RECIPIENTS": "example.net, Boss@Example.COM"},
            [b"<anyone@example.net>", b"<boss@example.com>"],
            [b"<bob@example.org>", b"<other@example.com>"],
        ),
        # --allow replaces the environment variable's list.
        (
            ("--allow", "example.com", "--allow", "<ceo@example.net>"),
            {"ALLOWED_RECIPIENTS": "example.org"},
            [b"<anyone@example.com>", b"<ceo@example.net>"],
            [b"<bob@example.org>", b"<cfo@example.net>"],
        ),
    ],
)
async def test_recipient_allowlist_process_takes_the_list_from_env_and_flags(
    args: tuple[str, ...],
    env: dict[str, str],
    allowed: list[bytes],
    refused: list[bytes],
    tmp_path: Path,
) -> None:
    log = tmp_path / "recipient_allowlist.log"
    async with example_process("recipient_allowlist", log, *args, env=env) as (process, address):
        async with bridge_to(address) as bridge, Mta.connect(bridge.port) as mta:
            answers = await mta.deliver(message(recipients=(*allowed, *refused)))
            assert answers == [
                *([r.Continue()] for _ in allowed),
                *(UNKNOWN_MAILBOX for _ in refused),
                [r.Continue()],
            ]
        assert await terminate(process) == 0
