"""upstream/pool.py against real SDK replicas (PolicyServers on port 0) behind one
``ipv4:`` channel with round_robin: sessions spread evenly over the replicas whatever
the number of streams, and a replica shutting down drains (its streams take no new
sessions, finish those they have) without failing any session."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc.aio
import pytest

from milter_bridge.upstream.channel import make_channel
from milter_bridge.upstream.pool import SharedStreams
from milter_bridge.upstream.shared import SharedStream, sessions_method
from milter_bridge.v1 import policy_pb2 as pb
from milter_policy import PolicyServer
from tests.sdk.test_shared import Slow
from tests.upstream.test_shared_stream import LONG, mail, start


@contextlib.asynccontextmanager
async def replicas(
    count: int, streams: int
) -> AsyncIterator[tuple[list[PolicyServer], SharedStreams, Counter[str], Slow]]:
    slow = Slow()
    servers = [PolicyServer(slow.policy, "127.0.0.1:0") for _ in range(count)]
    for server in servers:
        await server.start()
    channel = make_channel("ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers))
    await every_replica_connected(channel, count)
    given: Counter[str] = Counter()
    pool = SharedStreams(
        sessions_method(channel),
        streams,
        lambda: (),
        on_sessions=lambda replica, n: given.update({replica.rsplit(":", 1)[1]: n}),
    )
    try:
        yield servers, pool, given, slow
    finally:
        await pool.close()
        await channel.close(None)
        for server in servers:
            await server.stop(0)


async def every_replica_connected(channel: grpc.aio.Channel, count: int) -> None:
    """Readiness: streams opened one after another have reached every replica (gRPC's
    round_robin picks only among connected ones, as a bridge's channel is by the time
    its first MTA connection arrives)."""
    seen: set[str] = set()
    answered = asyncio.Event()

    def saw(replica: str) -> None:
        seen.add(replica)
        answered.set()

    async with asyncio.timeout(LONG):
        while len(seen) < count:
            answered.clear()
            probe = SharedStream(sessions_method(channel), on_replica=saw)
            await answered.wait()  # its replica is known
            probe.cancel()


async def one_session(pool: SharedStreams, n: int, sender: str = "ok@x.test") -> int:
    until = asyncio.get_running_loop().time() + LONG
    session = pool.open_session()
    await session.send(start(f"s{n}"), until)
    await session.send(mail(sender), until)
    action = (await session.receive(until)).verdict.action
    await session.close()
    return action


@pytest.mark.parametrize("concurrency", [1, 16])
async def test_sessions_spread_evenly_over_three_replicas_on_four_streams(
    concurrency: int,
) -> None:
    """Four streams land 2/1/1 on three replicas; the sessions still spread by replica,
    each within 15 % of a third, one at a time as well as 16 at once."""
    async with replicas(3, 4) as (servers, pool, given, _):
        sessions = 300
        queue = iter(range(sessions))

        async def worker() -> None:
            for n in queue:
                assert await one_session(pool, n) == pb.ACTION_CONTINUE

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        assert sorted(given) == sorted(str(s.port) for s in servers)
        assert sum(given.values()) == sessions
        for replica, count in given.items():
            assert abs(count - sessions / 3) <= 0.15 * sessions / 3, (replica, given)


async def test_a_replica_shutting_down_drains_its_streams() -> None:
    """A replica stops gracefully while it holds a session: that session is answered
    there, and every new session goes to the other replica, none failed."""
    async with replicas(2, 2) as (servers, pool, given, slow):
        until = asyncio.get_running_loop().time() + LONG
        held = pool.open_session()
        await held.send(start("held"), until)
        await held.send(mail("slow@x.test"), until)
        await slow.holding(1, LONG)  # a replica holds the session
        # The policy holding it may run before the bridge has read which replica it is
        # (the response header): the barrier is the bridge's own count.
        async with asyncio.timeout(LONG):
            while not given:
                await asyncio.sleep(0.01)
        holder = next(s for s in servers if str(s.port) in given)
        other = next(s for s in servers if s is not holder)
        stopping = asyncio.ensure_future(holder.stop(LONG))
        async with asyncio.timeout(LONG):
            while not any(s.retired for s in pool._streams if s is not None):
                await asyncio.sleep(0.01)  # the draining message arrived
        given.clear()
        actions = [await one_session(pool, n) for n in range(20)]
        assert actions == [pb.ACTION_CONTINUE] * 20
        assert set(given) == {str(other.port)}
        slow.release.set()
        assert (await held.receive(until)).verdict.action == pb.ACTION_CONTINUE
        await held.close()
        await asyncio.wait_for(stopping, LONG)  # the drained replica's calls ended
