"""How the black-box fuzzer (fuzz/exchange.py) judges one connection, against scripted peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fuzz.exchange import Ending, Target, exchange
from fuzz.inputs import FuzzInput, sessions
from milter_bridge.config import ConfigError
from milter_bridge.protocol import encode
from milter_bridge.protocol import replies as r

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
DATA = b"".join(dict(sessions())["sendmail-bs"])
ITEM = FuzzInput(0, 0, "sendmail-bs", (), DATA, (10, 100, len(DATA)), (0.0, 0.001, 0.0))


@asynccontextmanager
async def peer(tmp_path: Path, handle: Peer) -> AsyncIterator[Target]:
    path = tmp_path / "peer.sock"
    server = await asyncio.start_unix_server(handle, str(path))
    async with server:
        yield Target.parse(f"unix:{path}")


def answering(data: bytes) -> Peer:
    """A peer that reads to the EOF, sends ``data`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(data)
        await writer.drain()
        writer.close()

    return handle


async def test_replies_then_close(tmp_path: Path) -> None:
    async with peer(tmp_path, answering(encode(r.Continue()) * 3)) as target:
        outcome = await exchange(target, ITEM, 10)
    assert outcome.ending is Ending.REPLIED
    assert outcome.replies == 3
    assert outcome.bad_reply is None
    assert outcome.sent == len(ITEM.data)
    assert not outcome.cut_short


async def test_close_without_reply(tmp_path: Path) -> None:
    async with peer(tmp_path, answering(b"")) as target:
        outcome = await exchange(target, ITEM, 10)
    assert outcome.ending is Ending.SILENT


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (b"\0\0\0\x01Z", "unknown reply byte"),
        (b"\0\0\0\x02r!", "unexpected trailing"),  # a reject carries nothing
        (b"\0\0\0\x05c", "closed inside a reply"),
    ],
)
async def test_a_reply_that_does_not_decode_is_a_finding(
    tmp_path: Path, sent: bytes, why: str
) -> None:
    async with peer(tmp_path, answering(encode(r.Continue()) + sent)) as target:
        outcome = await exchange(target, ITEM, 10)
    assert outcome.bad_reply is not None
    assert why in outcome.bad_reply
    assert outcome.replies == 1


async def test_a_peer_that_never_closes_is_a_hang(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the fuzzer's EOF arrives, and nothing follows it
        await release.wait()
        writer.close()

    async with peer(tmp_path, handle) as target:
        outcome = await exchange(target, ITEM, 0.3)
        release.set()
    assert outcome.ending is Ending.HANG
    assert outcome.after_eof >= 0.3


async def test_nobody_listening(tmp_path: Path) -> None:
    outcome = await exchange(Target.parse(f"unix:{tmp_path}/none.sock"), ITEM, 10)
    assert outcome.ending is Ending.CONNECT_FAILED


def test_only_loopback_targets() -> None:
    assert Target.parse("inet:127.0.0.1:8890").address == ("127.0.0.1", 8890)
    assert Target.parse("inet6:[::1]:8890").address == ("::1", 8890)
    for far in ("inet:192.0.2.1:8890", "inet6:[2001:db8::1]:8890"):
        with pytest.raises(ConfigError, match="only loopback"):
            Target.parse(far)
