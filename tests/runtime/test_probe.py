"""``milter-bridge probe``: the health check of a listening bridge."""

from __future__ import annotations

import asyncio
import sys

from milter_bridge.config import Config, Listen, ListenKind
from milter_bridge.server.bridge import Bridge
from tests.runtime.policy import PolicyServer, ScriptedPolicy
from tests.session import harness as h


async def run_probe(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "milter_bridge", "probe", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_probe_a_listening_bridge_and_a_closed_port() -> None:
    server = PolicyServer(ScriptedPolicy(h.eom_only()))
    await server.start()
    bridge = Bridge(
        Config(listen=Listen(ListenKind.INET, host="127.0.0.1"), upstream=server.target)
    )
    await bridge.start()
    port = bridge.port
    try:
        assert await bridge.capabilities.plan(10.0) is not None
        code, out, _ = await run_probe("--connect", f"inet:127.0.0.1:{port}")
        assert code == 0
        assert "negotiated version 6, actions 0xFF, protocol 0x8F3C0" in out
        assert out.rstrip().endswith("; policy capabilities known")
        code, out, _ = await run_probe("--connect", f"inet:127.0.0.1:{port}", "--require-policy")
        assert code == 0
    finally:
        await bridge.stop()
        await server.stop()
    code, _, err = await run_probe("--connect", f"inet:127.0.0.1:{port}", "--timeout", "2")
    assert code == 1
    assert "connect call failed" in err.lower()
    code, _, err = await run_probe("--connect", "tcp:x")
    assert code == 2
    assert "--connect: 'tcp:x' is not" in err


async def test_probe_tells_a_bridge_without_its_policy() -> None:
    server = PolicyServer(ScriptedPolicy(h.eom_only()))
    await server.start()
    target = server.target
    await server.stop()  # nothing listens there now
    config = Config(
        listen=Listen(ListenKind.INET, host="127.0.0.1"), upstream=target, describe_wait=0.05
    )
    bridge = Bridge(config)
    await bridge.start()
    try:
        spec = f"inet:127.0.0.1:{bridge.port}"
        code, out, _ = await run_probe("--connect", spec)
        assert code == 0  # alive: it listens and negotiates
        assert out.rstrip().endswith("; no policy capabilities known")
        code, _, err = await run_probe("--connect", spec, "--require-policy")
        assert code == 1  # not ready
        assert "no policy capabilities known" in err
    finally:
        await bridge.stop()
