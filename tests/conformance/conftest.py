"""The conformance suite's world, started once per test run: a policy, the bridge, real MTAs
pointed at it, and one SMTP sink they relay to.

Each test scripts the policy (``world.policy.decide``) and sends mail through an
MTA with a real SMTP client; the sink shows what the MTA delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.server.bridge import Bridge
from milter_bridge.v1 import policy_pb2 as pb
from tests.mta.postfix import Postfix
from tests.mta.sendmail import Sendmail
from tests.mta.sink import SmtpSink
from tests.mta.test_sendmail_smoke import require_sendmail
from tests.prerequisites import require
from tests.runtime.policy import PolicyServer, ScriptedPolicy, always_continue
from tests.runtime.process import BridgeProcess
from tests.runtime.workers import ready, until

EVENTS = [f.name for f in pb.EventModes.DESCRIPTOR.fields]

# One set of capabilities for every scenario: the policy sees and decides
# every event, may make every modification, and asks for macros per stage.
CAPABILITIES = pb.Capabilities(
    events=pb.EventModes(
        **{e: pb.EVENT_MODE_OBSERVE if e == "abort" else pb.EVENT_MODE_DECIDE for e in EVENTS}
    ),
    header_delivery=pb.HEADER_DELIVERY_EACH,
    body_delivery=pb.BODY_DELIVERY_STREAM,
    end_of_message_content=pb.EndOfMessageContent(envelope=True, headers=True),
    actions=pb.Actions(**{f.name: True for f in pb.Actions.DESCRIPTOR.fields}),
    macros=pb.MacroRequest(
        connect=["j", "{daemon_name}", "{client_addr}", "{client_name}"],
        helo=["{client_addr}"],
        mail_from=["i", "{mail_addr}", "{mail_host}"],
        rcpt_to=["i", "{rcpt_addr}"],
        data=["i"],
        end_of_headers=["i"],
        end_of_message=["i", "j"],
    ),
)


@dataclass
class World:
    policy: ScriptedPolicy
    bridge: Bridge | None  # None: the bridge runs as its own process (--workers N)
    sink: SmtpSink
    mtas: dict[str, Postfix | Sendmail]
    upstream: str  # the policy's gRPC target


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def world() -> AsyncIterator[World]:
    async with started_world(workers=1) as started:
        yield started


@contextlib.asynccontextmanager
async def started_world(workers: int) -> AsyncIterator[World]:
    """The policy, the bridge (in this process, or with ``workers`` > 1 as its own
    process with that many workers), both MTAs and the sink."""
    require(root=True, commands=("postfix",))
    sendmail_tree = require_sendmail()
    policy = ScriptedPolicy(CAPABILITIES)
    server = PolicyServer(policy)
    await server.start()
    # Postfix's own users must reach the instance: pytest's tmp_path is 0700.
    base = Path(tempfile.mkdtemp(prefix="milter-bridge-conformance-"))
    base.chmod(0o755)
    bridge, process = None, None
    if workers == 1:
        bridge = Bridge(
            Config(listen=Listen(ListenKind.INET, host="127.0.0.1"), upstream=server.target)
        )
        await bridge.start()
        assert await bridge.capabilities.plan(10.0) is not None
        port = bridge.port
    else:
        process = BridgeProcess(
            base / "bridge.sock",
            server.target,
            "--workers",
            str(workers),
            "--metrics-listen",
            "127.0.0.1:0",
            tcp=True,
        )
        try:
            await process.start()
            await until(lambda: _ready(process), "every worker ready")
        except BaseException:
            await process.stop()
            raise
        port = process.port
    sink = SmtpSink()
    await sink.start()
    mtas: dict[str, Postfix | Sendmail] = {
        "postfix": Postfix(base / "postfix", f"inet:127.0.0.1:{port}", sink.port),
        "sendmail": Sendmail(base / "sendmail", f"inet:{port}@127.0.0.1", sink.port, sendmail_tree),
    }
    log = ""
    try:
        for mta in mtas.values():
            await mta.start()
        yield World(policy, bridge, sink, mtas, server.target)
    finally:
        for mta in mtas.values():
            await mta.stop()
        if bridge is not None:
            await bridge.stop()
        if process is not None:
            await process.stop()
            log = process.log()
        await server.stop()
        await sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert " ERROR " not in log, log


async def _ready(process: BridgeProcess) -> bool:
    return await ready(process) == 200


async def _describe(world: World, capabilities: pb.Capabilities) -> None:
    world.policy.capabilities = capabilities
    assert world.bridge is not None, "only a bridge in this process is told to refresh"
    world.bridge.capabilities.refresh_now()
    async with asyncio.timeout(10):  # waits for the bridge to have them, not for time to pass
        while (plan := world.bridge.capabilities.current) is None or (
            plan.capabilities != capabilities
        ):
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def described(world: World, capabilities: pb.Capabilities) -> AsyncIterator[None]:
    """SMTP sessions started inside the block are negotiated with these capabilities.

    Both MTAs open a new milter connection, and so negotiate anew, for every SMTP
    session; afterwards the world's own CAPABILITIES are back in the bridge.
    """
    await _describe(world, capabilities)
    try:
        yield
    finally:
        await _describe(world, CAPABILITIES)


MTAS = ["postfix", "sendmail"]


@pytest.fixture(params=MTAS)
def mta_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fresh(world: World) -> Iterator[World]:
    """Each scenario starts with a policy that continues and an empty sink."""
    world.policy.decide = always_continue
    while not world.sink.messages.empty():
        world.sink.messages.get_nowait()
    yield world
    world.policy.decide = always_continue


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """On a failing scenario, show the log of the MTA it ran through."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    funcargs = getattr(item, "funcargs", {})
    world, name = funcargs.get("fresh") or funcargs.get("world"), funcargs.get("mta_name")
    if report.failed and isinstance(world, World) and name in world.mtas:
        report.sections.append((f"{name} log", world.mtas[name].log()))
