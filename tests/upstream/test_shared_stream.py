"""upstream/shared.py against the SDK's real SharedPolicyService (a PolicyServer on port 0):
sessions on one stream answered under their keys, written together, a refusal that fails
one session only, a server gone that fails them all, the close handler at a session's end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from milter_bridge.upstream.channel import make_channel
from milter_bridge.upstream.pool import SharedStreams
from milter_bridge.upstream.shared import SharedStream, sessions_method
from milter_bridge.upstream.stream import StreamFailure
from milter_bridge.v1 import policy_pb2 as pb
from milter_policy import PolicyServer
from tests.faults.proxy import Proxy
from tests.sdk.test_shared import Slow

LONG = 30.0


def start(session_id: str, fingerprint: str = "") -> pb.ProcessRequest:
    return pb.ProcessRequest(
        sequence=1, start=pb.StreamStart(fingerprint=fingerprint, session_id=session_id)
    )


def mail(sender: str) -> pb.ProcessRequest:
    return pb.ProcessRequest(
        sequence=2, reply_expected=True, mail_from=pb.MailFrom(address=f"<{sender}>")
    )


@contextlib.asynccontextmanager
async def stream_to(slow: Slow) -> AsyncIterator[tuple[SharedStream, PolicyServer]]:
    server = PolicyServer(slow.policy, "127.0.0.1:0")
    await server.start()
    channel = make_channel(f"127.0.0.1:{server.port}")
    replicas: list[str] = []
    stream = SharedStream(sessions_method(channel), on_replica=replicas.append)
    try:
        yield stream, server
    finally:
        stream.cancel()
        await channel.close(None)
        await server.stop(0)


async def test_sessions_answered_under_their_keys_and_closed() -> None:
    slow = Slow()
    async with stream_to(slow) as (stream, _):
        until = asyncio.get_running_loop().time() + LONG
        one, two = stream.open_session(), stream.open_session()
        for session, name, sender in ((one, "s1", "ok@x.test"), (two, "s2", "bad@x.test")):
            assert await session.send(start(name), until)
            assert await session.send(mail(sender), until)
        assert (await two.receive(until)).verdict.action == pb.ACTION_REJECT
        assert (await one.receive(until)).verdict.action == pb.ACTION_CONTINUE
        await one.close()
        await two.close()
        assert stream.sessions == 0
        await stream.close()
        assert stream.broken is not None  # the policy ended the call once half-closed
    assert sorted(slow.closed) == ["s1", "s2"]


async def test_a_refused_session_fails_alone() -> None:
    slow = Slow()
    async with stream_to(slow) as (stream, _):
        until = asyncio.get_running_loop().time() + LONG
        refused, fine = stream.open_session(), stream.open_session()
        await refused.send(start("old", fingerprint="an-old-one"), until)
        await refused.send(mail("ok@x.test"), until)
        await fine.send(start("new", fingerprint=slow.policy.fingerprint), until)
        await fine.send(mail("ok@x.test"), until)
        with pytest.raises(StreamFailure) as failed:
            await refused.receive(until)
        assert failed.value.cause == "refused_stream"
        assert failed.value.refresh_capabilities
        assert (await fine.receive(until)).verdict.action == pb.ACTION_CONTINUE
        assert stream.broken is None
        # A request on the refused session sends nothing and harms no other session.
        assert await refused.send(mail("again@x.test"), until)
        await fine.send(pb.ProcessRequest(sequence=3, reply_expected=True, data=pb.Data()), until)
        assert (await fine.receive(until)).sequence == 3
        assert stream.broken is None


async def test_a_server_gone_fails_every_session_on_the_stream() -> None:
    slow = Slow()
    async with stream_to(slow) as (stream, server):
        until = asyncio.get_running_loop().time() + LONG
        waiting = [stream.open_session() for _ in range(3)]
        for n, session in enumerate(waiting):
            await session.send(start(f"s{n}"), until)
            await session.send(mail("slow@x.test"), until)  # held by the policy
        # The barrier that the requests arrived: the policy's handlers are waiting.
        await slow.holding(3, LONG)
        await server.stop(0)
        causes = []
        for session in waiting:
            try:
                await session.receive(until)
            except StreamFailure as exc:
                causes.append(exc.cause)
        assert causes == ["unreachable"] * 3
        assert stream.broken is not None
        assert stream.broken.cause == "unreachable"


async def test_a_request_after_the_stream_broke_gets_the_streams_failure() -> None:
    """What a connection sees when it sends on a session whose stream broke meanwhile: the
    stream's own failure and cause from receive(), not a guess at a timeout."""
    slow = Slow()
    async with stream_to(slow) as (stream, server):
        until = asyncio.get_running_loop().time() + LONG
        session = stream.open_session()
        await session.send(start("s1"), until)
        await session.send(mail("slow@x.test"), until)
        await slow.holding(1, LONG)
        await server.stop(0)
        async with asyncio.timeout(LONG):
            while stream.broken is None:
                await asyncio.sleep(0.01)
        assert await session.send(mail("next@x.test"), until)
        with pytest.raises(StreamFailure) as failed:
            await session.receive(until)
        assert failed.value.cause == "unreachable"


async def test_a_replica_gone_makes_its_sessions_replayable_and_a_new_stream_takes_over() -> None:
    """The pool's stream breaks because its replica stopped: its session fails as
    ``replayable`` (the connection replays it, session/journal.py), and the next session
    gets a new stream, to the replica that took the old one's place on the same port."""
    first, second = Slow(), Slow()
    server = PolicyServer(first.policy, "127.0.0.1:0")
    await server.start()
    channel = make_channel(f"127.0.0.1:{server.port}")
    pool = SharedStreams(sessions_method(channel), 1, lambda: ())
    replacement = None
    try:
        until = asyncio.get_running_loop().time() + LONG
        session = pool.open_session()
        await session.send(start("s1"), until)
        await session.send(mail("slow@x.test"), until)
        await first.holding(1, LONG)  # the first replica holds it, unanswered
        await server.stop(0)
        with pytest.raises(StreamFailure) as failed:
            await session.receive(until)
        assert failed.value.replayable
        assert failed.value.cause == "unreachable"
        replacement = PolicyServer(second.policy, f"127.0.0.1:{server.port}")
        await replacement.start()
        again = pool.open_session()
        await again.send(start("s2"), until)
        await again.send(mail("ok@x.test"), until)
        assert (await again.receive(until)).verdict.action == pb.ACTION_CONTINUE
        assert pool.opened == 2
    finally:
        await channel.close(None)
        if replacement is not None:
            await replacement.stop(0)


async def test_a_stream_that_fails_for_the_policys_own_error_is_not_replayable() -> None:
    """A status that is the policy's own (its handler raised: UNKNOWN), not its replica
    going away, fails the session with a failure that must not be replayed."""

    async def sessions(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for _ in requests:
            raise RuntimeError("a bug in the policy")
        yield b""  # pragma: no cover - makes this a generator

    handler = grpc.method_handlers_generic_handler(
        "milter_bridge.v1.SharedPolicyService",
        {"Sessions": grpc.stream_stream_rpc_method_handler(sessions)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        stream = SharedStream(sessions_method(channel))
        until = asyncio.get_running_loop().time() + LONG
        session = stream.open_session()
        await session.send(start("s1"), until)
        await session.send(mail("ok@x.test"), until)
        with pytest.raises(StreamFailure) as failed:
            await session.receive(until)
        assert failed.value.code is grpc.StatusCode.UNKNOWN
        assert not failed.value.replayable
    finally:
        await channel.close(None)
        await server.stop(0)


async def test_a_stream_silent_past_a_deadline_is_retired(tmp_path: Path) -> None:
    """Nothing at all comes on the stream after a session asked (a partition: the
    proxy between holds every byte): the session's timeout retires the stream, so no new
    session goes there, long before keepalive would notice. A stream that is merely slow
    for one session (it answered another meanwhile) is not retired."""
    slow = Slow()
    server = PolicyServer(slow.policy, f"unix:{tmp_path / 'policy.sock'}")
    await server.start()
    proxy = Proxy(tmp_path / "proxy.sock", tmp_path / "policy.sock")
    await proxy.start()
    channel = make_channel(proxy.target)
    try:
        stream = SharedStream(sessions_method(channel))
        loop = asyncio.get_running_loop()
        held, fast = stream.open_session(), stream.open_session()
        until = loop.time() + LONG
        await held.send(start("held"), until)
        await held.send(mail("slow@x.test"), until)
        await fast.send(start("fast"), until)
        await fast.send(mail("ok@x.test"), until)
        assert (await fast.receive(until)).verdict.action == pb.ACTION_CONTINUE
        # Slow, not silent: fast's answer came on the stream after held asked.
        with pytest.raises(TimeoutError):
            await held.receive(loop.time() + 0.2)
        assert not held.timed_out()  # fast's answer came after held asked: not silent
        assert not stream.retired
        proxy.pause()
        again = stream.open_session()
        await again.send(start("again"), until)
        await again.send(mail("ok@x.test"), until)
        with pytest.raises(TimeoutError):
            await again.receive(loop.time() + 0.2)
        assert again.timed_out()
        assert stream.retired
    finally:
        proxy.resume()
        slow.release.set()
        await channel.close(None)
        await proxy.stop()
        await server.stop(0)
