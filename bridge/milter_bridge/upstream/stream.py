"""One Process stream: the policy side of one SMTP session.

Opened at the first event that must be sent. One reader task per stream
reads every response into a queue; the connection waits on that queue with
its own deadline (never on a pending ``read()``: cancelling one leaks, see
grpc#43360). The normal end is a half-close (``done_writing``) and reading to
the end; ``cancel()`` only on failure, but then always.

gRPC never retries a started stream. This one is reopened, and what was sent
on it so far replayed, when it fails with UNAVAILABLE before any reply was
used: with several replicas the new call may go to another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import grpc.aio

from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc

OPEN_ATTEMPTS = 3
# Requests kept for a replay; a stream that sent more before its first reply is not replayed.
REPLAY_LIMIT = 1 << 20
CLOSE_TIMEOUT = 5.0

_END = object()
# grpc.aio.EOF, which grpc-stubs does not declare.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


class StreamFailure(Exception):
    """The stream broke or ended while an answer was awaited."""

    def __init__(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(reason)
        self.code = code


class PolicyStream:
    def __init__(
        self,
        stub: policy_pb2_grpc.PolicyServiceAsyncStub,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self._stub = stub
        self._log = log
        self._call: grpc.aio.StreamStreamCall[pb.ProcessRequest, pb.ProcessResponse] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._sent: list[pb.ProcessRequest] | None = []  # None: too much to replay
        self._sent_bytes = 0
        self._replied = False
        self._attempts = 0

    def _open(self) -> None:
        self._attempts += 1
        self._queue = asyncio.Queue()
        # wait_for_ready: a policy restarting rides through; the stage deadline bounds the wait.
        call = self._stub.Process(None, wait_for_ready=True)  # requests are written one by one
        self._call = call
        self._reader = asyncio.create_task(self._read(call), name="policy-reader")

    async def _read(
        self, call: grpc.aio.StreamStreamCall[pb.ProcessRequest, pb.ProcessResponse]
    ) -> None:
        queue = self._queue
        try:
            while True:
                response = await call.read()
                if response is _EOF:
                    queue.put_nowait(_END)
                    return
                queue.put_nowait(response)  # a ProcessResponse
        except grpc.aio.AioRpcError as exc:
            queue.put_nowait(exc)

    async def send(self, request: pb.ProcessRequest, timeout: float) -> bool:
        """Write one request; False when the policy did not take it within ``timeout``.

        A policy that stops reading blocks writes (gRPC flow control): the write
        runs as its own task and, when it takes too long, the call is cancelled,
        which ends the write. Other failures show up at the next receive().
        """
        if self._call is None:
            self._open()
        if self._sent is not None and not self._replied:
            self._sent.append(request)
            self._sent_bytes += request.ByteSize()
            if self._sent_bytes > REPLAY_LIMIT:
                self._sent = None
        write = asyncio.ensure_future(self._write(request))
        done, _ = await asyncio.wait([write], timeout=timeout)
        if done:
            return True
        self.cancel()
        await asyncio.wait([write], timeout=CLOSE_TIMEOUT)
        return False

    async def _write(self, request: pb.ProcessRequest) -> None:
        assert self._call is not None
        # A call that already failed refuses writes; its status reaches the reader.
        with contextlib.suppress(
            grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError
        ):
            await self._call.write(request)

    async def receive(self, timeout: float) -> pb.ProcessResponse:
        """The next response; raises TimeoutError or StreamFailure."""
        while True:
            item = await asyncio.wait_for(self._queue.get(), timeout)
            if isinstance(item, pb.ProcessResponse):
                self._replied = True
                self._sent = None
                return item
            if item is _END:
                raise StreamFailure("the policy ended the stream without answering")
            assert isinstance(item, grpc.aio.AioRpcError)
            code = item.code()
            if code is grpc.StatusCode.UNAVAILABLE and await self._reopen():
                continue
            raise StreamFailure(f"stream failed: {code.name}: {item.details()}", code)

    async def _reopen(self) -> bool:
        if self._replied or self._sent is None or self._attempts >= OPEN_ATTEMPTS:
            return False
        self._log.info(
            "policy stream unavailable, opening it again (attempt %d)", self._attempts + 1
        )
        replay = list(self._sent)
        self._open()
        for request in replay:
            await self._write(request)
        return True

    async def close(self) -> None:
        """Normal end: half-close, then read to the end (bounded), cancel if it does not end."""
        call, reader = self._call, self._reader
        if call is None or reader is None:
            return
        with contextlib.suppress(
            grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError
        ):
            await call.done_writing()
        done, _ = await asyncio.wait([reader], timeout=CLOSE_TIMEOUT)
        if not done:
            self._log.warning(
                "policy did not end its stream within %.0fs; cancelling it", CLOSE_TIMEOUT
            )
            self.cancel()
            await asyncio.wait([reader], timeout=CLOSE_TIMEOUT)

    def cancel(self) -> None:
        """On failure: the call is cancelled, and with it the reader's pending read."""
        if self._call is not None:
            self._call.cancel()
