"""One Process stream: the policy side of one SMTP session.

Opened at the first event that must be sent. One reader task per stream
reads every response into a queue; the connection waits on that queue with
its own deadline (never on a pending ``read()``: cancelling one leaks, see
grpc#43360). The normal end is a half-close (``done_writing``) and reading to
the end; ``cancel()`` only on failure, but then always. Every wait here is
bounded by the caller's deadline: writes (a policy that stops reading blocks
them through HTTP/2 flow control, an unreachable one with wait_for_ready)
run as tasks, and one that misses its deadline cancels the call. While a
wait lasts, ``tick`` is called every ``tick_every`` seconds: the connection
keeps an MTA that waits for end of message alive with SMFIR_PROGRESS.

Responses arrive as bytes and are parsed here: a reply that is not a
ProcessResponse fails the stream with cause ``invalid_reply`` (grpc's own
deserializer would log a traceback and hand ``read()`` a None). So does a
response naming a request that was written only after the response arrived
(a duplicate numbered ahead, an answer guessed before the question): by the
time it is taken its sequence matches, but it cannot answer what the policy
had not seen. Each queued response keeps the highest sequence written when it
arrived, which is set before each write starts, so no real answer can arrive
before it. An early answer that arrives after its request was written cannot
be told from a real one.

How a stream ended is read once, in ``status.classify`` (its table: status and
circumstance -> cause, retry, refresh), from the status gRPC Core delivered
(``first_status.StatusRecord``), not the ``INTERNAL`` grpc.aio may put over it.
gRPC never retries a started stream. This one is reopened, and what was sent
on it so far replayed (StreamStart.attempt counts up), when the table allows a
retry (UNAVAILABLE before any reply was used), within the caller's deadline:
with several replicas the new call may go to another one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from milter_bridge.session.journal import with_attempt
from milter_bridge.upstream.channel import MAX_ANSWER_SIZE, ProcessMethod
from milter_bridge.upstream.first_status import StatusRecord
from milter_bridge.upstream.security import Metadata, no_metadata
from milter_bridge.upstream.status import Classification, classify
from milter_bridge.v1 import policy_pb2 as pb

OPEN_ATTEMPTS = 3
# Requests kept for a replay; a stream that sent more before its first reply is not replayed.
REPLAY_LIMIT = 1 << 20
CLOSE_TIMEOUT = 5.0
# Responses nobody has asked for yet, and their bytes; a policy sending more is
# broken (memory per connection stays bounded: one answer may be MAX_ANSWER_SIZE).
MAX_UNREAD_RESPONSES = 64
MAX_UNREAD_BYTES = MAX_ANSWER_SIZE

_END = object()
# grpc.aio.EOF, which grpc-stubs does not declare.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
# What a write or half-close on a call that already ended raises: besides the RPC's
# error, grpc.aio's InternalError (ExecuteBatchError when Core refuses the batch,
# seen when the policy's process was killed while streams were being closed).
CALL_ERRORS = (
    grpc.aio.AioRpcError,
    grpc.aio.UsageError,
    grpc.aio.InternalError,
    asyncio.InvalidStateError,
)

Tick = Callable[[], Awaitable[None]]


class StreamFailure(Exception):
    """The stream broke or ended while an answer was awaited.

    ``cause`` is the failure cause (a metrics label); ``refresh_capabilities``
    says whether the policy's capabilities should be fetched again at once;
    ``replayable``: a shared stream broke because its replica went away, and
    each session on it may be replayed on another (session/journal.py).
    """

    def __init__(
        self,
        reason: str,
        cause: str = "stream_error",
        *,
        code: grpc.StatusCode | None = None,
        refresh_capabilities: bool = False,
        replayable: bool = False,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.cause = cause
        self.refresh_capabilities = refresh_capabilities
        self.replayable = replayable


Call = grpc.aio.StreamStreamCall[pb.ProcessRequest, bytes]


async def no_tick() -> None:
    return None


async def wait_ticking(
    future: asyncio.Future[Any], until: float, tick: Tick, tick_every: float
) -> bool:
    """Whether ``future`` is done by loop time ``until``; ``tick()`` every ``tick_every``
    seconds while it is not (the connection keeps a waiting MTA alive with it)."""
    loop = asyncio.get_running_loop()
    while True:
        left = until - loop.time()
        if left <= 0:
            return future.done()
        done, _ = await asyncio.wait([future], timeout=min(left, tick_every))
        if done:
            return True
        await tick()


class PolicyStream:
    def __init__(  # noqa: PLR0917 - one stream's collaborators
        self,
        process: ProcessMethod,
        log: logging.LoggerAdapter[logging.Logger],
        on_retry: Callable[[], object] | None = None,
        metadata: Callable[[], Metadata] = no_metadata,
        on_replica: Callable[[str], object] | None = None,
        tick: Tick = no_tick,
        tick_every: float = 1.0,
    ) -> None:
        self._process = process
        self._metadata = metadata
        self._on_replica = on_replica
        self._on_retry = on_retry
        self._tick = tick
        self._tick_every = tick_every
        self._log = log
        self._call: Call | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        # Of each queued response: its size, and the highest sequence written when it was read.
        self._unread: collections.deque[tuple[int, int]] = collections.deque()
        self._unread_bytes = 0
        self._written = 0  # the highest sequence handed to the current call
        self._sent: list[pb.ProcessRequest] | None = []  # None: too much to replay
        self._sent_bytes = 0
        self._replied = False
        self._attempts = 0
        self._cancelled = False
        self.failure: str | None = None  # how the stream ended, if not normally

    def _open(self) -> None:
        self._attempts += 1
        self._queue = asyncio.Queue()
        self._unread.clear()
        self._unread_bytes = 0
        self._written = 0
        # wait_for_ready: a restarting policy is waited for; the caller's deadline bounds it.
        call = self._process(
            None, wait_for_ready=True, metadata=self._metadata()
        )  # requests are written one by one
        self._call = call
        # Made before anything is written (first_status.py).
        status = StatusRecord(call)
        self._reader = asyncio.create_task(
            self._read(call, status, self._queue), name="policy-reader"
        )

    async def _read(self, call: Call, status: StatusRecord, queue: asyncio.Queue[object]) -> None:
        try:
            if self._on_replica is not None:
                # Which replica took the stream, as it says in its response headers.
                headers = await call.initial_metadata()
                self._on_replica(replica_of(headers))
            while True:
                read = await call.read()
                if read is _EOF:
                    queue.put_nowait(_END)
                    return
                data = bytes(read)  # type: ignore[call-overload]  # no deserializer: bytes
                if (
                    queue.qsize() >= MAX_UNREAD_RESPONSES
                    or self._unread_bytes + len(data) > MAX_UNREAD_BYTES
                ):
                    unasked = (
                        f"the policy sent over {MAX_UNREAD_RESPONSES} unasked responses"
                        f" or {MAX_UNREAD_BYTES >> 20} MiB of them"
                    )
                    self._fail_call(call, unasked, "invalid_reply")
                    return
                try:
                    response = pb.ProcessResponse.FromString(data)
                except DecodeError as exc:
                    invalid = f"the policy's reply is not a ProcessResponse ({exc})"
                    self._fail_call(call, invalid, "invalid_reply")
                    return
                if response.WhichOneof("response") == "progress" and not queue.empty():
                    # "Still working", while the connection has not taken what came
                    # before: dropped, so that a policy flooding progress neither fills
                    # the queue nor the MTA's socket (the connection also rate-limits).
                    continue
                self._unread.append((len(data), self._written))
                self._unread_bytes += len(data)
                queue.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            code, details = status.of(exc)
            if not self._cancelled:
                self.failure = f"{code.name}: {details}"
            queue.put_nowait((code, details))
        except asyncio.CancelledError:
            # The call was cancelled (by cancel()); the reader ends with it.
            queue.put_nowait(StreamFailure("the stream was cancelled"))

    def _fail_call(self, call: Call, reason: str, cause: str) -> None:
        """The policy broke the protocol: the call is cancelled, the next receive() fails."""
        self.failure = reason
        self._queue.put_nowait(StreamFailure(reason, cause))
        self._cancelled = True
        call.cancel()

    async def _wait(self, future: asyncio.Future[Any], until: float) -> bool:
        """Whether ``future`` is done by loop time ``until``; ticks while it is not."""
        return await wait_ticking(future, until, self._tick, self._tick_every)

    async def _write(self, request: pb.ProcessRequest, until: float) -> bool:
        """Hand one request to gRPC by loop time ``until``; False (call cancelled) if not."""
        assert self._call is not None
        call = self._call
        # Before the write starts: the policy cannot answer a request before this.
        self._written = max(self._written, request.sequence)

        async def write() -> None:
            # A call that already failed refuses writes; its status reaches the reader.
            with contextlib.suppress(*CALL_ERRORS):
                await call.write(request)

        task = asyncio.ensure_future(write())
        if await self._wait(task, until):
            return True
        self.cancel()
        # Once its call is cancelled, a write that waits for a connection never ends
        # by itself (measured: not within 10 s); cancelling it then ends it at once.
        task.cancel()
        await asyncio.wait([task], timeout=CLOSE_TIMEOUT)
        return False

    async def send(self, request: pb.ProcessRequest, until: float) -> bool:
        """Write one request by loop time ``until``; False when the policy did not take it."""
        if self._call is None:
            self._open()
        if self._sent is not None and not self._replied:
            self._sent.append(request)
            self._sent_bytes += request.ByteSize()
            if self._sent_bytes > REPLAY_LIMIT:
                self._sent = None
        return await self._write(request, until)

    async def receive(self, until: float) -> pb.ProcessResponse:
        """The next response by loop time ``until``; raises TimeoutError or StreamFailure."""
        while True:
            if self._queue.empty():
                getter = asyncio.ensure_future(self._queue.get())
                if not await self._wait(getter, until):
                    getter.cancel()
                    raise TimeoutError
                item = getter.result()
            else:
                item = self._queue.get_nowait()
            if isinstance(item, pb.ProcessResponse):
                size, written = self._unread.popleft()
                self._unread_bytes -= size
                if written < item.sequence <= self._written:
                    # Sent before its request was: a guess, or meant for another. (A
                    # sequence never written is the session's to refuse: a wrong one.)
                    premature = f"the policy answered sequence {item.sequence} before it was sent"
                    raise StreamFailure(premature, "invalid_reply")
                self._replied = True
                self._sent = None
                return item
            if item is _END:
                raise StreamFailure("the policy ended the stream without answering")
            if isinstance(item, StreamFailure):
                raise item
            assert isinstance(item, tuple)
            code, details = item
            meaning = classify(code, details, replied=self._replied)
            if meaning.retry and await self._reopen(until):
                continue
            raise failure_of(code, details, meaning)

    async def _reopen(self, until: float) -> bool:
        if self._sent is None or self._attempts >= OPEN_ATTEMPTS:
            return False
        self._log.info(
            "policy stream unavailable, opening it again (attempt %d)", self._attempts + 1
        )
        if self._on_retry is not None:
            self._on_retry()
        replay = list(self._sent)
        self._open()
        for request in replay:
            if request.HasField("start"):
                request = with_attempt(request, self._attempts - 1)  # noqa: PLW2901
            if not await self._write(request, until):
                return False
        return True

    async def close(self) -> None:
        """Normal end: half-close, then read to the end; cancel what does not end in time."""
        call, reader = self._call, self._reader
        if call is None or reader is None:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_TIMEOUT

        async def half_close() -> None:
            with contextlib.suppress(*CALL_ERRORS):
                await call.done_writing()

        closing = asyncio.ensure_future(half_close())
        await asyncio.wait(
            [closing, reader], timeout=CLOSE_TIMEOUT, return_when=asyncio.ALL_COMPLETED
        )
        if not reader.done():
            self._log.warning(
                "policy did not end its stream within %.0fs; cancelling it", CLOSE_TIMEOUT
            )
            self.cancel()
            closing.cancel()  # a half-close still waiting ends with its cancelled call
            await asyncio.wait(
                [closing, reader], timeout=max(until - loop.time(), 0) + CLOSE_TIMEOUT
            )
        if self.failure is not None:
            # Events were only observed, so nobody waited on this stream's answer.
            self._log.warning("policy stream ended badly: %s", self.failure)

    def cancel(self) -> None:
        """On failure: the call is cancelled, and with it the reader's pending read."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


def failure_of(
    code: grpc.StatusCode, details: str, meaning: Classification, *, replayable: bool = False
) -> StreamFailure:
    return StreamFailure(
        f"stream failed: {code.name}: {details}",
        meaning.cause,
        code=code,
        refresh_capabilities=meaning.refresh_capabilities,
        replayable=replayable,
    )


REPLICA_HEADER = "milter-policy-replica"  # policy.proto: sent by a policy in its response headers


def replica_of(headers: object) -> str:
    """The replica's name from the stream's response headers; "unknown" when it sends none."""
    for key, value in headers or ():  # type: ignore[attr-defined]
        if key == REPLICA_HEADER:
            return str(value)[:128]
    return "unknown"
