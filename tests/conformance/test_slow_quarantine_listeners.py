"""Quarantine, a policy slower than the MTA's read timeout, and a unix-socket listener."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from tests.conformance.conftest import World
from tests.conformance.mods import M, at_end
from tests.conformance.smtp import Message, send
from tests.mta.postfix import Postfix
from tests.mta.sendmail import Sendmail

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_quarantine_holds_the_message(fresh: World, mta_name: str) -> None:
    fresh.policy.decide = at_end(M(quarantine=pb.Quarantine(reason="looks odd")))
    assert (await send(fresh.mtas[mta_name].port, Message(subject="hold me"))).accepted
    fresh.policy.decide = at_end()
    assert (await send(fresh.mtas[mta_name].port, Message(subject="marker"))).accepted
    assert (await fresh.sink.next()).header("Subject") == [
        "marker"
    ]  # the held one is not delivered
    mta = fresh.mtas[mta_name]
    if isinstance(mta, Postfix):  # Postfix: the hold queue, without the reason
        assert [m["queue_name"] for m in mta.queue()] == ["hold"]
    else:  # Sendmail: its quarantine queue, with the reason
        assert list((await mta.quarantined()).values()) == ["looks odd"]


async def test_a_policy_taking_15_seconds_at_end_of_message(fresh: World, mta_name: str) -> None:
    # Longer than Sendmail's 10 s read timeout: the bridge's progress keeps the MTA waiting.
    slow_mods = at_end(M(add_header=pb.AddHeader(name="X-Slow", value=b"15s")))

    async def slow(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "end_of_message":
            await asyncio.sleep(15)  # the policy's own slowness, not a wait in the test
        return await slow_mods(request)

    fresh.policy.decide = slow
    assert (await send(fresh.mtas[mta_name].port, Message(subject="slow"))).accepted
    assert (await fresh.sink.next()).header("X-Slow") == ["15s"]


async def test_unix_socket_listener(fresh: World, mta_name: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="milter-bridge-unix-"))
    base.chmod(0o755)
    socket = base / "bridge.sock"
    listen = Listen(ListenKind.UNIX, path=str(socket))
    config = Config(listen=listen, upstream=fresh.upstream, socket_mode=0o666)
    bridge = Bridge(config)
    await bridge.start()
    mta: Postfix | Sendmail
    if mta_name == "postfix":
        mta = Postfix(base / "postfix", f"unix:{socket}", fresh.sink.port)
    else:
        tree = fresh.mtas["sendmail"].tree  # type: ignore[union-attr]
        mta = Sendmail(base / "sendmail", f"unix:{socket}", fresh.sink.port, tree)
    try:
        await mta.start()
        fresh.policy.decide = at_end(M(add_header=pb.AddHeader(name="X-Via", value=b"unix")))
        assert (await send(mta.port, Message(subject="over unix"))).accepted
        assert (await fresh.sink.next()).header("X-Via") == ["unix"]
    finally:
        await mta.stop()
        await bridge.stop()
        shutil.rmtree(base, ignore_errors=True)
