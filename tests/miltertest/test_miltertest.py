"""OpenDKIM's miltertest drives the running bridge where real MTAs cannot on demand.

Each test starts a policy and the bridge in this event loop (tests/runtime/stack.py), puts a
recording TCP proxy between miltertest and the bridge, runs a Lua script from this folder with
miltertest as a child process (asyncio, so the bridge keeps serving meanwhile), and checks
miltertest's verdict (its exit status), the bytes on the wire and what the policy received.

* An old MTA (protocol version 2, actions 0x3f, steps 0x7f): the bridge must answer byte for
  byte as libmilter did to the same miltertest script (tests/fixtures/captured/
  miltertest-negotiate-v2.json), and the policy must see no DATA or UNKNOWN events.
* A body SKIP: with SMFIP_SKIP offered (v6) the policy's ACTION_SKIP reaches miltertest as
  SMFIR_SKIP; offered without it, the bridge answers CONTINUE and forwards no more chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from milter_bridge.v1 import policy_pb2 as pb
from tests.captured import CAPTURED, load
from tests.prerequisites import require
from tests.runtime.policy import Recorded, verdict
from tests.runtime.stack import Stack, running
from tests.session.harness import DECIDE, SKIP, decide_everything

HERE = Path(__file__).parent
TIMEOUT = 30.0  # seconds for one miltertest run (its own read timeout is 10 s per reply)


@pytest.fixture(autouse=True)
def _miltertest() -> None:
    require(commands=("miltertest",))


# --- a recording proxy: the bytes each way, split into milter frames -------------------------


def frames(data: bytes) -> list[bytes]:
    """Split a byte stream into whole milter frames (length prefix included); no leftovers."""
    out: list[bytes] = []
    rest = data
    while rest:
        assert len(rest) >= 4, f"truncated length prefix: {rest!r}"
        end = 4 + int.from_bytes(rest[:4], "big")
        assert len(rest) >= end, f"truncated frame: {rest!r}"
        out.append(rest[:end])
        rest = rest[end:]
    return out


@dataclass
class Recording:
    """One proxied connection: every byte each way, in order."""

    from_mta: bytearray = field(default_factory=bytearray)
    from_milter: bytearray = field(default_factory=bytearray)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # both directions closed

    def commands(self) -> list[bytes]:
        return frames(bytes(self.from_mta))

    def replies(self) -> list[bytes]:
        return frames(bytes(self.from_milter))


class Proxy:
    """Listens on 127.0.0.1, forwards each connection to the bridge unchanged and records it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.recordings: list[Recording] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        recording = Recording()
        self.recordings.append(recording)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, recording.from_mta),
                self._pump(up_reader, writer, recording.from_milter),
            )
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
            recording.done.set()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray
    ) -> None:
        try:
            while data := await reader.read(65536):
                record += data
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass


@contextlib.asynccontextmanager
async def proxied(stack: Stack) -> AsyncIterator[Proxy]:
    proxy = Proxy(stack.bridge.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def miltertest(script: str, port: int, **defines: str) -> str:
    """Run a script of this folder against 127.0.0.1:port; its stdout. Fails on exit status != 0."""
    args = ["-D", f"port={port}", "-D", f"here={HERE}"]
    for name, value in defines.items():
        args += ["-D", f"{name}={value}"]
    exe = shutil.which("miltertest")
    assert exe is not None
    process = await asyncio.create_subprocess_exec(
        exe,
        *args,
        "-s",
        str(HERE / script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"miltertest {script} exited {process.returncode}:\n{text}"
    assert "ALL CHECKS PASSED" in text, text
    return text


async def finished(stack: Stack, proxy: Proxy) -> tuple[Recording, Recorded]:
    """The one proxied connection and the one policy stream, once both have ended."""
    assert len(proxy.recordings) == 1
    recording = proxy.recordings[0]
    await asyncio.wait_for(recording.done.wait(), TIMEOUT)
    assert len(stack.policy.streams) == 1
    stream = stack.policy.streams[0]
    await asyncio.wait_for(stream.finished.wait(), TIMEOUT)
    assert stream.ended_by_bridge, "the bridge should half-close the stream at QUIT"
    return recording, stream


def optneg(version: int, actions: int, protocol: int) -> bytes:
    """An OPTNEG frame ('O', either direction) without macro lists."""
    return struct.pack(">IcIII", 13, b"O", version, actions, protocol)


def start_of(stream: Recorded) -> pb.StreamStart:
    assert stream.requests[0].HasField("start")
    return stream.requests[0].start


# --- (1) an old MTA: version 2 ----------------------------------------------------------------


async def reference_milter(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    """What tools/capture/reference_milter.py did for Subject "ADDHDR CHGHDR eom-reply"."""
    if not request.HasField("end_of_message"):
        return [verdict(request)]
    answer = pb.EndOfMessageResponse(
        modifications=[
            pb.Modification(
                add_header=pb.AddHeader(name="X-Ref-Added", value=b"added by the reference milter")
            ),
            pb.Modification(
                change_header=pb.ChangeHeader(
                    name="X-Change-Me", index=1, value=b"changed by the reference milter"
                )
            ),
        ],
        verdict=pb.Verdict(
            action=pb.ACTION_REJECT,
            reply=pb.SmtpReply(
                code=550, enhanced_code="5.7.1", lines=["reference milter rejects at eom"]
            ),
        ),
    )
    return [pb.ProcessResponse(sequence=request.sequence, end_of_message=answer)]


async def test_version_2_negotiation_and_transaction_match_libmilter() -> None:
    libmilter = load(CAPTURED / "miltertest-negotiate-v2.json")
    async with running(decide_everything()) as stack, proxied(stack) as proxy:
        stack.policy.decide = reference_milter
        output = await miltertest("negotiate_v2.lua", proxy.port)
        recording, stream = await finished(stack, proxy)

    # miltertest sent what it sent to libmilter (else the comparison below means nothing) ...
    assert recording.commands() == [p.frame for p in libmilter.packets if p.from_mta], output
    # ... and the bridge answered with libmilter's bytes: OPTNEG reply version 2, actions 0x3f,
    # protocol 0; 'c' to everything (DATA included); at end of message 'h', 'm', then 'y'.
    replies = recording.replies()
    assert replies[0] == optneg(2, 0x3F, 0)
    assert replies == [p.frame for p in libmilter.packets if not p.from_mta]

    start = start_of(stream)
    assert start.negotiated.protocol_version == 2
    assert start.negotiated.events.data == SKIP
    assert start.negotiated.events.unknown == SKIP
    assert start.negotiated.events.body == DECIDE
    assert not start.negotiated.skip
    assert start.negotiated.actions == pb.Actions(
        add_header=True,
        change_header=True,
        replace_body=True,
        add_recipient=True,
        delete_recipient=True,
        quarantine=True,
    )
    # The DATA miltertest sent was answered by the bridge, not forwarded.
    assert stream.events() == [
        "start",
        "connect",
        "helo",
        "mail_from",
        "rcpt_to",
        "header",
        "header",
        "end_of_headers",
        "body_chunk",
        "end_of_message",
    ]
    assert all(r.reply_expected for r in stream.requests[1:])


# --- (2) a policy that skips the body -----------------------------------------------------


async def skip_first_chunk(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    if request.HasField("body_chunk"):
        return [verdict(request, pb.ACTION_SKIP)]
    return [verdict(request)]


BEFORE_BODY = [
    "start",
    "connect",
    "helo",
    "mail_from",
    "rcpt_to",
    "data",
    "header",
    "end_of_headers",
]

SKIP_REPLY = bytes.fromhex("0000000173")  # 's'
CONTINUE_REPLY = bytes.fromhex("0000000163")  # 'c'


async def test_skip_reaches_the_mta_when_negotiated() -> None:
    async with running(decide_everything()) as stack, proxied(stack) as proxy:
        stack.policy.decide = skip_first_chunk
        output = await miltertest("body_skip.lua", proxy.port, skip="1")
        recording, stream = await finished(stack, proxy)

    # miltertest's default offer: version 6, actions 0x1ff, protocol 0x1fffff
    assert recording.commands()[0] == optneg(6, 0x1FF, 0x1FFFFF)
    # the bridge asks for version 6, the policy's actions (all but SETSYMLIST: no macro lists)
    # and, as the only protocol flag, SMFIP_SKIP (every event is DECIDE: no NO*/NR* flags)
    assert recording.replies()[0] == optneg(6, 0xFF, 0x400)
    # The reply to the one BODY command ('B') is SMFIR_SKIP.
    commands = recording.commands()
    body = [i for i, c in enumerate(commands) if c[4:5] == b"B"]
    assert len(body) == 1, output
    replies = recording.replies()
    assert replies[body[0]] == SKIP_REPLY  # one reply per command up to here (no NR flags)

    start = start_of(stream)
    assert start.negotiated.protocol_version == 6
    assert start.negotiated.skip
    assert stream.events() == [*BEFORE_BODY, "body_chunk", "end_of_message"]
    assert stream.requests[-2].body_chunk.data == b"first chunk\r\n"
    assert stream.requests[-1].end_of_message.body_size == len(b"first chunk\r\n")


async def test_skip_without_smfip_skip_continues_and_stops_forwarding() -> None:
    async with running(decide_everything()) as stack, proxied(stack) as proxy:
        stack.policy.decide = skip_first_chunk
        output = await miltertest("body_skip.lua", proxy.port, skip="0")
        recording, stream = await finished(stack, proxy)

    # offered: version 6, actions 0x1ff, protocol 0x1fffff without SMFIP_SKIP (0x400)
    assert recording.commands()[0] == optneg(6, 0x1FF, 0x1FFFFF & ~0x400)
    # as with SKIP offered, but no protocol flag at all
    assert recording.replies()[0] == optneg(6, 0xFF, 0)
    # All three BODY commands are answered CONTINUE; no 's' anywhere.
    commands = recording.commands()
    replies = recording.replies()
    body = [i for i, c in enumerate(commands) if c[4:5] == b"B"]
    assert len(body) == 3, output
    assert [replies[i] for i in body] == [CONTINUE_REPLY] * 3
    assert SKIP_REPLY not in replies

    start = start_of(stream)
    assert start.negotiated.protocol_version == 6
    assert not start.negotiated.skip
    # Only the first chunk reached the policy; the other two were answered by the bridge.
    assert stream.events() == [*BEFORE_BODY, "body_chunk", "end_of_message"]
    assert stream.requests[-2].body_chunk.data == b"first chunk\r\n"
    # body_size counts every body byte the MTA sent, the two chunks not forwarded included.
    sent = b"first chunk\r\n" + b"second chunk\r\n" + b"third chunk\r\n"
    assert stream.requests[-1].end_of_message.body_size == len(sent)
