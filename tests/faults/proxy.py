"""A byte proxy between the bridge and the policy that can stop forwarding without
closing anything: a network partition as the bridge sees it (the TCP connection
stays up, nothing arrives, no RST, no FIN), then healed.

It listens on a unix socket and connects each accepted connection to the
policy's unix socket. While paused it reads nothing from either side, so what
the peers write stays in the socket buffers, as in a partition where the
packets are held up; ``resume`` delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

CHUNK = 65536


class Proxy:
    def __init__(self, listen: Path, upstream: Path) -> None:
        self.listen = listen
        self.upstream = upstream
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def target(self) -> str:
        return f"unix:{self.listen}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, str(self.listen))

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(src, dst))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                await self._open.wait()
                data = await src.read(CHUNK)
                await self._open.wait()  # what was read as the partition began waits too
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        dst.close()
        self._writers.discard(dst)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
