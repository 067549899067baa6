"""The Python SDK through the real bridge: a Policy served on port 0, an MTA client on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ProtocolFlag
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from milter_policy import Context, Policy, PolicyServer, PolicyUsageError
from milter_policy.testing import check_async, check_eml
from tests.runtime.mta_client import MtaClient
from tests.session import harness as h

P = ProtocolFlag


@contextlib.asynccontextmanager
async def bridged(policy: Policy, **settings: float) -> AsyncIterator[Bridge]:
    server = PolicyServer(policy, "127.0.0.1:0")
    await server.start()
    listen = Listen(ListenKind.INET, host="127.0.0.1", port=0)
    bridge = Bridge(Config(listen=listen, upstream=f"127.0.0.1:{server.port}", **settings))  # type: ignore[arg-type]
    await bridge.start()
    assert await bridge.capabilities.plan(10.0) is not None
    try:
        yield bridge
    finally:
        await bridge.stop()
        await server.stop(1.0)


async def mta(bridge: Bridge) -> MtaClient:
    client = await MtaClient.connect(bridge.port)
    await client.negotiate()
    return client


def stamper() -> Policy:
    policy = Policy("stamper")

    @policy.end_of_message
    def stamp(ctx: Context) -> None:
        subject = b"".join(ctx.header("Subject"))
        ctx.add_header("X-Stamped", b"for " + subject)
        ctx.accept()

    return policy


async def test_end_of_message_only_policy_one_round_trip_and_flags() -> None:
    policy = stamper()
    rounds = 0
    original = policy.handlers["end_of_message"].func

    def counting(ctx: Context) -> None:
        nonlocal rounds
        rounds += 1
        original(ctx)

    policy.on("end_of_message", counting)
    async with bridged(policy) as bridge:
        client = await MtaClient.connect(bridge.port)
        reply = await client.negotiate()
        # NO* for what nobody needs, NR* for what is only collected for end of message.
        assert reply.protocol & P.SMFIP_NODATA
        assert reply.protocol & P.SMFIP_NOEOH
        assert reply.protocol & P.SMFIP_NOUNKNOWN
        assert reply.protocol & P.SMFIP_NOBODY
        for nr in (
            P.SMFIP_NR_CONN,
            P.SMFIP_NR_HELO,
            P.SMFIP_NR_MAIL,
            P.SMFIP_NR_RCPT,
            P.SMFIP_NR_HDR,
        ):
            assert reply.protocol & nr
        for _ in range(2):
            await client.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt())
            await client.send(cmd.Header(b"Subject", b"hello"))
            assert await client.command(*h.eom()) == [
                r.AddHeader(b"X-Stamped", b"for hello"),
                r.Accept(),
            ]
        await client.close()
    assert rounds == 2  # one policy round trip per message


async def test_modification_outside_end_of_message_is_a_clear_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = Policy("wrong")

    @policy.rcpt_to
    def too_early(ctx: Context, address: str, args: list[str]) -> None:
        if "bad" in address:
            ctx.add_header("X-Too", "early")  # raises PolicyUsageError

    with pytest.raises(
        PolicyUsageError,
        match=r"add_header\(\) is only valid in the end_of_message handler, not outside a handler",
    ):
        Context().add_header("X", "y")  # outside any handler too
    async with bridged(policy) as bridge:
        client = await mta(bridge)  # the MTA sends only RCPT (NO* for the rest)
        assert await client.command(*h.rcpt(b"<bad@x>")) == [r.TempFail()]  # the error verdict
        assert "the rcpt_to handler raised" in caplog.text
        assert (
            "add_header() is only valid in the end_of_message handler, not in rcpt_to"
            in caplog.text
        )
        # The stream and the next message on the same connection go on.
        assert await client.command(*h.rcpt(b"<good@x>")) == [r.Continue()]
        await client.send(cmd.Abort())
        assert await client.command(*h.rcpt(b"<good2@x>")) == [r.Continue()]
        await client.close()


async def test_a_blocked_sync_handler_does_not_delay_another_connection() -> None:
    policy = Policy("blocking")
    release = threading.Event()
    entered = threading.Event()

    @policy.helo
    def block(ctx: Context, name: str) -> None:
        if name == "slow":
            entered.set()
            release.wait(30)

    async with bridged(policy) as bridge:
        slow, fast = await mta(bridge), await mta(bridge)
        await slow.send(cmd.Helo(b"slow"))
        await asyncio.to_thread(entered.wait, 30)
        assert await fast.command(cmd.Helo(b"fast")) == [r.Continue()]  # while "slow" is blocked
        release.set()
        assert await slow.reply() == [r.Continue()]
        await slow.close()
        await fast.close()


async def test_every_action_on_the_wire() -> None:
    policy = Policy("everything")

    @policy.end_of_message
    def act(ctx: Context) -> None:
        ctx.progress()
        ctx.add_header("X-Add", "1")
        ctx.insert_header(0, "X-Ins", "2")
        ctx.change_header("Subject", "new", index=1)
        ctx.delete_header("X-Old", index=2)
        ctx.add_recipient("<a@x>")
        ctx.add_recipient("<b@x>", args=["NOTIFY=NEVER"])
        ctx.delete_recipient("<rcpt@example.test>")
        ctx.replace_body(b"new body\r\n")
        ctx.set_sender("<s@x>", args=["RET=HDRS"])
        ctx.quarantine("why")
        ctx.reject(["first", "second"], code=554, xcode="5.7.0")

    async with bridged(policy) as bridge:
        client = await mta(bridge)
        await client.send(*h.connect(), *h.mail(), *h.rcpt())
        assert await client.command(*h.eom()) == [
            r.Progress(),
            r.AddHeader(b"X-Add", b"1"),
            r.InsertHeader(0, b"X-Ins", b"2"),
            r.ChangeHeader(1, b"Subject", b"new"),
            r.ChangeHeader(2, b"X-Old", b""),
            r.AddRecipient(b"<a@x>"),
            r.AddRecipientWithArgs(b"<b@x>", b"NOTIFY=NEVER"),
            r.DeleteRecipient(b"<rcpt@example.test>"),
            r.ReplaceBody(b"new body\r\n"),
            r.ChangeSender(b"<s@x>", b"RET=HDRS"),
            r.Quarantine(b"why"),
            r.ReplyCode(b"554-5.7.0 first\r\n554 5.7.0 second"),
        ]
        await client.close()


@pytest.mark.parametrize(
    ("act", "packet"),
    [
        (lambda c: c.accept(), r.Accept()),
        (lambda c: c.continue_(), r.Continue()),
        (lambda c: c.discard(), r.Discard()),
        (lambda c: c.reject(), r.Reject()),
        (lambda c: c.tempfail(), r.TempFail()),
        (lambda c: c.tempfail("later"), r.ReplyCode(b"451 4.7.1 later")),
        (lambda c: c.reject("no", code=553, xcode="5.1.8"), r.ReplyCode(b"553 5.1.8 no")),
    ],
)
async def test_every_verdict_on_the_wire(act: object, packet: r.MilterReply) -> None:
    policy = Policy("verdicts")
    policy.on("mail_from", lambda ctx, address, args: act(ctx))  # type: ignore[operator]
    async with bridged(policy) as bridge:
        client = await mta(bridge)
        assert await client.command(*h.mail()) == [packet]
        await client.close()


async def test_skip_in_a_body_handler() -> None:
    policy = Policy("skipper")
    chunks: list[bytes] = []

    @policy.body
    def body(ctx: Context, chunk: bytes) -> None:
        chunks.append(chunk)
        ctx.skip()

    async with bridged(policy) as bridge:
        client = await mta(bridge)
        assert await client.command(cmd.Body(b"one\r\n")) == [r.Skip()]
        await client.close()
    assert chunks == [b"one\r\n"]


async def test_testing_helper_gives_what_the_bridge_gives() -> None:
    policy = stamper()
    result = await check_async(policy, headers=[("Subject", "hello")])
    assert result.final.action == pb.ACTION_ACCEPT
    assert [m.add_header.value for m in result.modifications] == [b"for hello"]
    assert [q.WhichOneof("event") for q in result.requests] == [
        "end_of_message"
    ]  # the rest collected


async def test_macros_of_an_earlier_message_do_not_linger() -> None:
    policy = Policy("macros", macros={"end_of_message": ["i"]})
    seen: list[str | None] = []

    @policy.end_of_message(envelope=False, headers=False)
    def remember(ctx: Context) -> None:
        seen.append(ctx.macro("i"))

    async with bridged(policy) as bridge:
        client = await mta(bridge)
        assert await client.command(*h.eom()) == [r.Continue()]  # D E with i=QID1
        second = cmd.DefineMacro(b"E", ((b"j", b"mx"),))  # a new message: no i
        assert await client.command(second, cmd.EndOfMessage()) == [r.Continue()]
        await client.close()
    assert seen == ["QID1", None]  # the end-of-message macros are the new message's


async def test_truncated_envelope_and_headers_reach_the_context() -> None:
    policy = Policy("limits")
    seen: list[tuple[int, bool, int, bool]] = []

    @policy.end_of_message(envelope=True, headers=True)
    def look(ctx: Context) -> None:
        e = ctx.envelope
        seen.append(
            (len(e.recipients), e.recipients_truncated, len(ctx.headers), ctx.headers_truncated)
        )

    async with bridged(policy, max_recipients=2, max_headers=1) as bridge:
        client = await mta(bridge)
        await client.send(
            *h.connect(), *h.mail(), *h.rcpt(), *h.rcpt(b"<b@x.test>"), *h.rcpt(b"<c@x.test>")
        )
        await client.send(cmd.Header(b"Subject", b"one"), cmd.Header(b"To", b"two"))
        assert await client.command(*h.eom()) == [r.Continue()]
        # The next message: under the limits, nothing truncated.
        await client.send(*h.mail(), *h.rcpt(), cmd.Header(b"Subject", b"one"))
        assert await client.command(*h.eom()) == [r.Continue()]
        await client.close()
    assert seen == [(2, True, 1, True), (1, False, 1, False)]


async def test_testing_helper_matches_the_real_bridge(tmp_path: Path) -> None:
    policy = stamper()
    async with bridged(policy) as bridge:
        client = await mta(bridge)
        await client.send(*h.connect(), *h.mail(), *h.rcpt(), cmd.Header(b"Subject", b"cross"))
        wire = await client.command(*h.eom())
        await client.close()
    result = await check_async(policy, headers=[("Subject", "cross")])
    # The same answer, once as milter packets and once as the policy's messages.
    assert wire == [r.AddHeader(b"X-Stamped", b"for cross"), r.Accept()]
    assert [(m.add_header.name, m.add_header.value) for m in result.modifications] == [
        ("X-Stamped", b"for cross")
    ]
    assert result.final.action == pb.ACTION_ACCEPT
    eml = tmp_path / "message.eml"
    eml.write_bytes(
        b"From: a@example.org\r\nTo: b@example.net\r\nSubject: from a file\r\n\r\nhi\r\n"
    )
    from_file = await asyncio.to_thread(check_eml, policy, eml)
    assert from_file.modifications[0].add_header.value == b"for from a file"


def test_every_public_name_is_documented() -> None:
    import milter_policy  # noqa: PLC0415
    import milter_policy.testing  # noqa: PLC0415

    for module in (milter_policy, milter_policy.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj):
                assert obj.__doc__, f"{module.__name__}.{name}"
                for attr, member in vars(obj).items() if isinstance(obj, type) else ():
                    if not attr.startswith("_") and callable(member):
                        assert member.__doc__, f"{module.__name__}.{name}.{attr}"


async def test_max_connection_age_keeps_streams_in_flight_within_the_grace() -> None:
    policy = Policy("slow-stamper")

    @policy.end_of_message
    async def stamp(ctx: Context) -> None:
        await asyncio.sleep(1.0)  # the policy's own slowness: past the connection's max age
        ctx.accept()

    server = PolicyServer(
        policy, "127.0.0.1:0", max_connection_age=0.5, max_connection_age_grace=30
    )
    await server.start()
    listen = Listen(ListenKind.INET, host="127.0.0.1", port=0)
    bridge = Bridge(Config(listen=listen, upstream=f"127.0.0.1:{server.port}"))
    await bridge.start()
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        client = await mta(bridge)
        await client.send(*h.connect(), *h.mail(), *h.rcpt())
        # The stream outlives the connection's maximum age (0.5 s) and, within the
        # grace (30 s), still gets its answer through.
        assert await client.command(*h.eom()) == [r.Accept()]
        await client.close()
        for _ in range(3):  # later sessions open new streams on the new connections
            client = await mta(bridge)
            await client.send(*h.connect(), *h.mail(), *h.rcpt())
            assert await client.command(*h.eom()) == [r.Accept()]
            await client.close()
    finally:
        await bridge.stop()
        await server.stop(1.0)


async def test_a_modification_the_mta_did_not_grant_is_not_sent() -> None:
    """An MTA that grants no SMFIF_ADDHDRS (Sendmail with a milter's F= flags, say): the
    SDK's add_header returns False and sends nothing, as libmilter's smfi_addheader fails,
    so the policy's verdict stands instead of the bridge refusing the whole answer."""
    granted: list[bool] = []
    policy = Policy("stamp-if-granted")

    @policy.end_of_message
    def stamp(ctx: Context) -> None:
        granted.append(ctx.add_header("X-Stamped", "yes"))
        ctx.accept()

    async with bridged(policy) as bridge:
        client = await MtaClient.connect(bridge.port)
        await client.negotiate(actions=0x1FF & ~0x01)  # every action but SMFIF_ADDHDRS
        await client.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt())
        assert await client.command(*h.eom()) == [r.Accept()]
        await client.close()
        client = await mta(bridge)  # an MTA that grants it
        await client.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt())
        assert await client.command(*h.eom()) == [r.AddHeader(b"X-Stamped", b"yes"), r.Accept()]
        await client.close()
    assert granted == [False, True]
