"""``python -m bench.streams``: what carrying a conversation on gRPC costs, three ways.

The question of the issue "Streams out of the hot path": a new Process stream
per SMTP session, a pool of long-lived streams reused one session at a time, or
sessions multiplexed on a few long-lived streams with the requests that are
ready together written as one gRPC message. Each way carries the same thing:
``--sessions`` conversations of one request (``--size`` bytes) and one reply,
``--concurrency`` at a time, from one grpc.aio client to an echo server in
another process (raw bytes, no protobuf: only the transport is measured). The
client runs on one core and the server on the other; the table gives each
side's CPU per conversation and the client's conversations per second, medians
of ``--runs``, and every ratio against the per-session stream of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio

SERVICE = "bench.Echo"
_HEAD = struct.Struct(">II")  # session key, payload length: one item of a batch


def pack(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_HEAD.pack(key, len(data)) + data for key, data in items)


def unpack(batch: bytes) -> list[tuple[int, bytes]]:
    items, at = [], 0
    while at < len(batch):
        key, size = _HEAD.unpack_from(batch, at)
        at += _HEAD.size
        items.append((key, batch[at : at + size]))
        at += size
    return items


# -- the server ---------------------------------------------------------------


async def _echo(requests: AsyncIterator[bytes], _: object) -> AsyncIterator[bytes]:
    """Every message back as it came: one reply per request, or per batch a batch
    of the same items (the multiplexed way's framing is the client's business)."""
    async for request in requests:
        yield request


async def serve(address: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.stream_stream_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),)
    )
    port = server.add_insecure_port(address)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# -- the three ways -----------------------------------------------------------

Method = grpc.aio.StreamStreamMultiCallable[bytes, bytes]
Way = Callable[[Method, int, int, bytes], Awaitable[None]]


async def per_session(method: Method, sessions: int, concurrency: int, payload: bytes) -> None:
    """A new stream per conversation: write, read the reply, half-close, end."""
    left = iter(range(sessions))

    async def caller() -> None:
        for _ in left:
            call = method(None)
            await call.write(payload)
            assert await call.read() == payload
            await call.done_writing()
            await call.read()  # EOF: the server ended the stream

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def pooled(method: Method, sessions: int, concurrency: int, payload: bytes) -> None:
    """Long-lived streams, each carrying one conversation at a time: a pool of
    ``concurrency`` streams, each caller keeps one (a real pool hands them out)."""
    left = iter(range(sessions))

    async def caller() -> None:
        call = method(None)
        for _ in left:
            await call.write(payload)
            assert await call.read() == payload
        await call.done_writing()

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def multiplexed(method: Method, sessions: int, concurrency: int, payload: bytes) -> None:
    """One long-lived stream: callers queue their request under a key; a writer sends
    what is queued as one batch; a reader hands each reply to its caller."""
    call = method(None)
    loop = asyncio.get_running_loop()
    queued: list[tuple[int, bytes]] = []
    waiting: dict[int, asyncio.Future[bytes]] = {}
    ready = asyncio.Event()

    async def writer() -> None:
        while True:
            await ready.wait()
            ready.clear()
            batch, queued[:] = pack(queued), []
            await call.write(batch)

    async def reader() -> None:
        while (batch := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            assert isinstance(batch, bytes)
            for key, data in unpack(batch):
                waiting.pop(key).set_result(data)

    left = iter(range(sessions))

    async def caller() -> None:
        for key in left:
            reply = waiting[key] = loop.create_future()
            queued.append((key, payload))
            ready.set()
            assert await reply == payload

    tasks = [asyncio.ensure_future(writer()), asyncio.ensure_future(reader())]
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    tasks[0].cancel()
    await call.done_writing()
    await tasks[1]


WAYS: dict[str, Way] = {
    "per-session stream": per_session,
    "pooled streams": pooled,
    "multiplexed, batched": multiplexed,
}


# -- measuring ----------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(way: Way, port: int, server_pid: int, args: argparse.Namespace) -> list[float]:
    """Client µs CPU, server µs CPU per conversation, conversations per second."""
    payload = os.urandom(args.size)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method: Method = channel.stream_stream(
            f"/{SERVICE}/Echo", request_serializer=None, response_deserializer=None
        )
        await way(method, 200, 8, payload)  # warm: connected, code paths hot
        cpu, server_cpu, wall = time.process_time(), _cpu_seconds(server_pid), time.monotonic()
        await way(method, args.sessions, args.concurrency, payload)
        wall = time.monotonic() - wall
        cpu = time.process_time() - cpu
        server_cpu = _cpu_seconds(server_pid) - server_cpu
    n = args.sessions
    return [cpu / n * 1e6, server_cpu / n * 1e6, n / wall]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    p.add_argument("--sessions", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--size", type=int, default=600, help="bytes per request and reply")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--serve", help=argparse.SUPPRESS)  # the server process
    args = p.parse_args(argv)
    if args.serve:
        os.sched_setaffinity(0, {1})
        asyncio.run(serve(args.serve))
        return
    os.sched_setaffinity(0, {0})
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.streams", "--serve", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        results = {
            name: [asyncio.run(measure(way, port, server.pid, args)) for _ in range(args.runs)]
            for name, way in WAYS.items()
        }
    finally:
        server.kill()
        server.wait()
    print(
        f"{args.sessions} conversations, {args.concurrency} at a time, {args.size}-byte"
        f" messages; medians of {args.runs}\n"
    )
    print("| way | client µs CPU | server µs CPU | conversations/s | client CPU ÷ per-session |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(r[0] for r in results["per-session stream"])
    for name, runs in results.items():
        client, server_us, rate = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {name} | {client:.0f} | {server_us:.0f} | {rate:.0f} | {client / base:.2f} |")


if __name__ == "__main__":
    main()
