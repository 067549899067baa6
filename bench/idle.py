"""Memory per idle MTA connection: N connections that completed OPTNEG, then wait.

Postfix keeps a milter connection open for the whole SMTP session, and most of
a session's time is the SMTP client's, so an MTA with many slow clients holds
many milter connections that wait. What one costs is the resident memory the
milter side grows by while N of them are open, divided by N.

Plain blocking sockets, one after the other: the benchmark process has nothing
else to do meanwhile, and connecting all at once would only test the milter's
listen backlog.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator, Sequence

from bench.processes import BenchFailure, Process
from milter_bridge.load.plan import OFFER_PACKET
from milter_bridge.protocol import FrameDecoder, ProtocolError, decode_reply
from milter_bridge.protocol import replies as r


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            msg = "the milter closed the connection during OPTNEG"
            raise ConnectionError(msg)
        data += chunk
    return data


def negotiate(path: str, timeout: float = 10.0) -> socket.socket:
    """A unix-socket connection that sent Postfix's OPTNEG and got the milter's reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(OFFER_PACKET)
        header = _read_exactly(sock, 4)
        (length,) = struct.unpack(">I", header)
        try:
            (frame,) = FrameDecoder().feed(header + _read_exactly(sock, length))
            reply = decode_reply(frame)
        except ProtocolError as exc:
            msg = f"answer to OPTNEG: {exc}"
            raise ConnectionError(msg) from None
        if not isinstance(reply, r.OptionNegotiationReply):
            msg = f"answer to OPTNEG: {reply!r}"
            raise ConnectionError(msg)
    except BaseException:
        sock.close()
        raise
    return sock


def wait_until_negotiating(path: str, processes: Sequence[Process], timeout: float) -> None:
    """Until the milter at ``path`` answers OPTNEG (it listens and is ready)."""
    deadline = time.monotonic() + timeout
    while True:
        for p in processes:
            p.check_alive()
        try:
            negotiate(path, timeout=max(0.1, deadline - time.monotonic())).close()
        except OSError as exc:
            if time.monotonic() > deadline:
                msg = f"no OPTNEG answer at {path} within {timeout:g} s: {exc}"
                raise BenchFailure(msg) from None
            time.sleep(0.05)
        else:
            return


@contextlib.contextmanager
def idle_connections(path: str, n: int) -> Iterator[list[socket.socket]]:
    """``n`` negotiated connections, open for the block; closed (without QUIT) after it."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            # One at a time, not extend(): those already held are closed if one fails.
            held.append(negotiate(path))  # noqa: PERF401
        yield held
    finally:
        for sock in held:
            sock.close()


def memory_per_connection(
    path: str, processes: Sequence[Process], n: int, settle: float = 1.0
) -> dict[str, float]:
    """Bytes of RSS each process grows by per idle connection, by process name.

    ``settle``: a wait before reading RSS, for a milter that sets a connection up
    after answering OPTNEG (a thread that is still starting, a task not yet run)."""
    before = {p.name: p.rss_bytes() for p in processes}
    try:
        with idle_connections(path, n):
            time.sleep(settle)
            for p in processes:
                p.check_alive()
            after = {p.name: p.rss_bytes() for p in processes}
    except OSError as exc:
        msg = f"could not hold {n} idle connections open at {path}: {exc}"
        raise BenchFailure(msg) from None
    return {name: (after[name] - before[name]) / n for name in before}
