"""The SDK's SharedPolicyService.Sessions, through a real PolicyServer on port 0 and a raw
grpc.aio client: sessions on one stream answered under their keys, a slow session beside
fast ones, a refusal by fingerprint that ends one session only, the close handler at a
session's end and at the stream's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc
from milter_policy import Context, Policy, PolicyServer
from tests.sdk.test_sdk import bridged, mta, stamper
from tests.session import harness as h

Call = grpc.aio.StreamStreamCall[pb.SessionsRequest, pb.SessionsResponse]


def start(key: int, fingerprint: str = "") -> pb.SessionRequest:
    request = pb.ProcessRequest(
        sequence=1, start=pb.StreamStart(fingerprint=fingerprint, session_id=f"s{key}")
    )
    return pb.SessionRequest(session=key, request=request)


def mail(key: int, sender: str) -> pb.SessionRequest:
    request = pb.ProcessRequest(
        sequence=2, reply_expected=True, mail_from=pb.MailFrom(address=f"<{sender}>")
    )
    return pb.SessionRequest(session=key, request=request)


def end(key: int) -> pb.SessionRequest:
    return pb.SessionRequest(session=key, end=pb.SessionEnd(reason="quit"))


class Slow:
    """A policy that rejects mail from bad@…, and holds mail from slow@… until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting: list[str] = []  # sessions whose handler waits for the release
        self._arrived = asyncio.Condition()
        self.attempts: list[int] = []  # StreamStart.attempt of each session seen
        self.closed: list[str] = []
        self.policy = Policy("shared-test")

        @self.policy.mail_from
        async def check(ctx: Context, address: str, args: list[str]) -> None:
            if "slow@" in address:
                async with self._arrived:
                    self.waiting.append(ctx.connection_id)
                    self.attempts.append(ctx.attempt)
                    self._arrived.notify_all()
                await self.release.wait()
            if "bad@" in address:
                ctx.reject("no", code=550, xcode="5.7.1")

        @self.policy.close
        def closed(ctx: Context) -> None:
            self.closed.append(ctx.connection_id)

    async def holding(self, count: int = 1, timeout: float = 30) -> None:
        """The barrier: ``count`` sessions are held by the policy, waiting for the release."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.waiting) >= count)


@contextlib.asynccontextmanager
async def shared_call(policy: Policy) -> AsyncIterator[Call]:
    server = PolicyServer(policy, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield policy_pb2_grpc.SharedPolicyServiceStub(channel).Sessions(None)
    finally:
        await server.stop(0)


async def responses(call: Call, count: int) -> list[pb.SessionResponse]:
    got: list[pb.SessionResponse] = []
    while len(got) < count:
        batch = await call.read()
        assert isinstance(batch, pb.SessionsResponse), batch
        got.extend(batch.responses)
    return got


def actions(got: list[pb.SessionResponse]) -> dict[int, int]:
    return {r.session: r.response.verdict.action for r in got}


async def test_sessions_in_one_message_answered_under_their_keys() -> None:
    slow = Slow()
    async with shared_call(slow.policy) as call:
        metadata = dict(await call.initial_metadata())
        assert str(metadata["milter-policy-replica"]).rsplit(":", 1)[1].isdigit()  # host:port
        await call.write(
            pb.SessionsRequest(
                requests=[start(7), start(9), mail(7, "good@x.test"), mail(9, "bad@x.test")]
            )
        )
        got = await responses(call, 2)
        assert actions(got) == {7: pb.ACTION_CONTINUE, 9: pb.ACTION_REJECT}
        assert all(r.response.sequence == 2 for r in got)
        await call.write(pb.SessionsRequest(requests=[end(7), end(9)]))
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await call.code() is grpc.StatusCode.OK
    assert sorted(slow.closed) == ["s7", "s9"]


async def test_a_slow_session_does_not_delay_the_others() -> None:
    slow = Slow()
    async with shared_call(slow.policy) as call:
        await call.write(pb.SessionsRequest(requests=[start(1), mail(1, "slow@x.test")]))
        # While session 1's handler waits, sessions 2 and 3 are answered: the barrier
        # is their answers, which come before session 1's.
        await call.write(
            pb.SessionsRequest(
                requests=[start(2), mail(2, "bad@x.test"), start(3), mail(3, "ok@x.test")]
            )
        )
        assert actions(await responses(call, 2)) == {2: pb.ACTION_REJECT, 3: pb.ACTION_CONTINUE}
        slow.release.set()
        assert actions(await responses(call, 1)) == {1: pb.ACTION_CONTINUE}
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    # The half-close ended every session still open.
    assert sorted(slow.closed) == ["s1", "s2", "s3"]


async def test_a_refused_session_ends_alone() -> None:
    slow = Slow()
    async with shared_call(slow.policy) as call:
        await call.write(
            pb.SessionsRequest(
                requests=[
                    start(1, fingerprint="an-old-one"),
                    mail(1, "ok@x.test"),  # of a refused session: dropped
                    pb.SessionRequest(session=2, request=mail(2, "ok@x.test").request),
                    start(3, fingerprint=slow.policy.fingerprint),
                    mail(3, "ok@x.test"),
                ]
            )
        )
        got = {r.session: r for r in await responses(call, 3)}
        assert got[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert got[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert got[3].response.verdict.action == pb.ACTION_CONTINUE
        await call.write(pb.SessionsRequest(requests=[end(1), end(2), end(3)]))
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await call.code() is grpc.StatusCode.OK
    assert slow.closed == ["s3"]  # only the session that began


async def test_through_the_bridge_on_shared_streams() -> None:
    """A bridge with --policy-streams 2 carries 12 SMTP sessions, 4 at a time, on two
    long-lived streams: every message gets the policy's verdict, no Process stream opens."""
    policy = stamper()
    async with bridged(policy, policy_streams=2) as bridge:

        async def session(n: int) -> list[r.MilterReply]:
            client = await mta(bridge)
            await client.send(*h.connect(), *h.helo(), *h.mail(), *h.rcpt())
            await client.send(cmd.Header(b"Subject", b"s%d" % n))
            replies = await client.command(*h.eom())
            await client.close()
            return replies

        for batch in range(3):
            got = await asyncio.gather(*(session(4 * batch + i) for i in range(4)))
            assert got == [
                [r.AddHeader(b"X-Stamped", b"for s%d" % (4 * batch + i)), r.Accept()]
                for i in range(4)
            ]
        assert bridge.shared is not None
        assert bridge.shared.opened == 2
        assert bridge.metrics.streams._value.get() == 0  # no Process stream


async def test_progress_while_a_shared_session_waits_at_end_of_message() -> None:
    """The bridge keeps an MTA that waits for end of message alive with SMFIR_PROGRESS on
    a shared stream too (Sendmail gives up on a milter silent for 10 s): two of its own
    keep-alives arrive while the policy's handler waits, then the verdict."""
    release = asyncio.Event()
    policy = Policy("slow-eom")

    @policy.end_of_message
    async def slow(ctx: Context) -> None:
        await release.wait()
        ctx.accept()

    async with bridged(policy, policy_streams=1, progress_interval=0.05) as bridge:
        client = await mta(bridge)
        await client.send(*h.connect(), *h.mail(), *h.rcpt(), *h.eom())
        async with asyncio.timeout(10):  # without keep-alives it would wait for ever
            for _ in range(2):
                assert await client.reader.readexactly(5) == b"\0\0\0\1p"
        release.set()
        replies = await client.reply()
        assert replies[-1] == r.Accept()
        assert all(x == r.Progress() for x in replies[:-1])
        await client.close()
        assert bridge.metrics.streams._value.get() == 0  # no Process stream: a shared one


async def test_a_replay_rebuilds_state_and_answers_only_what_awaits_an_answer() -> None:
    """A session replayed on a new stream (StreamStart.attempt 1): the events already
    decided run their handlers again with ctx.decided, and get no answer; the one that
    awaits an answer is answered, from the state those handlers rebuilt."""
    seen: list[tuple[str, str | None, int]] = []
    policy = Policy("replay-test")

    @policy.rcpt_to
    def recipient(ctx: Context, address: str, args: list[str]) -> None:
        seen.append((address, ctx.decided, ctx.attempt))
        ctx.state.setdefault("recipients", []).append(address)
        if len(ctx.state["recipients"]) > 2:
            ctx.tempfail("too many recipients", code=452, xcode="4.5.3")
        elif "no@" in address:
            ctx.reject("no such user", code=550, xcode="5.1.1")

    def rcpt(sequence: int, address: str, decided: int | None) -> pb.SessionRequest:
        request = pb.ProcessRequest(
            sequence=sequence,
            reply_expected=decided is None,
            rcpt_to=pb.RcptTo(address=address),
        )
        if decided is not None:
            request.decided.action = decided  # type: ignore[assignment]
        return pb.SessionRequest(session=4, request=request)

    replay = start(4)
    replay.request.start.attempt = 1
    async with shared_call(policy) as call:
        await call.write(
            pb.SessionsRequest(
                requests=[
                    replay,
                    rcpt(5, "<no@x.test>", pb.ACTION_REJECT),
                    rcpt(6, "<yes@x.test>", pb.ACTION_CONTINUE),
                    rcpt(7, "<third@x.test>", None),
                ]
            )
        )
        (got,) = await responses(call, 1)  # one answer only: to sequence 7
        assert got.session == 4
        assert got.response.sequence == 7
        assert got.response.verdict.action == pb.ACTION_TEMPFAIL
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    assert seen == [("<no@x.test>", "reject", 1), ("<yes@x.test>", "continue", 1),
                    ("<third@x.test>", None, 1)]  # fmt: skip


async def test_a_policy_shutting_down_tells_its_streams_it_drains() -> None:
    """PolicyServer.stop(): every Sessions stream gets SessionsResponse.draining, and the
    sessions on it go on and are answered until the bridge ends them."""
    slow = Slow()
    server = PolicyServer(slow.policy, "127.0.0.1:0")
    await server.start()
    stopping = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = policy_pb2_grpc.SharedPolicyServiceStub(channel).Sessions(None)
            await call.write(pb.SessionsRequest(requests=[start(1), mail(1, "slow@x.test")]))
            await slow.holding()
            stopping = asyncio.ensure_future(server.stop(30))
            drained = await call.read()
            assert isinstance(drained, pb.SessionsResponse)
            assert drained.draining
            assert not drained.responses
            slow.release.set()
            assert actions(await responses(call, 1)) == {1: pb.ACTION_CONTINUE}
            await call.write(pb.SessionsRequest(requests=[end(1)]))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
            assert await call.code() is grpc.StatusCode.OK
        await stopping
    finally:
        if stopping is None:
            await server.stop(0)
