"""One long-lived SharedPolicyService.Sessions stream carrying many SMTP sessions.

A building block of the issue "Streams out of the hot path", not yet used by
the connections. ``SharedStream.open_session()`` gives a ``SharedSession``
with PolicyStream's interface (``send``, ``receive``, ``close``, ``cancel``), so
that a connection can use either. What the sessions send is queued and one
writer task writes it as few SessionsRequest messages as there are moments
something is ready (each at most ``MAX_BATCH_BYTES``, below any policy's default
4 MiB receive limit, unless one request alone is larger); one reader task
hands each SessionResponse to its session by key.

Failures: a SessionError, an answer that names a request not yet sent, or more
unread answers than ``MAX_UNREAD`` fail that session only; a status that ends
the call, or a message that is not a SessionsResponse, fails every session on
the stream (classified as on Process, by ``status.classify``). Replaying the
sessions of a broken stream elsewhere is not done here yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from milter_bridge.upstream.first_status import StatusRecord
from milter_bridge.upstream.security import Metadata
from milter_bridge.upstream.status import classify
from milter_bridge.upstream.stream import (
    _CALL_ERRORS,
    OPEN_ATTEMPTS,
    REPLAY_LIMIT,
    StreamFailure,
    _failure,
    _with_attempt,
    replica_of,
)
from milter_bridge.v1 import policy_pb2 as pb

MAX_BATCH_BYTES = 1 << 20
MAX_UNREAD = 64  # answers one session has not taken yet
SESSIONS_METHOD = "/{}/Sessions".format(
    pb.DESCRIPTOR.services_by_name["SharedPolicyService"].full_name
)

SessionsMethod = grpc.aio.StreamStreamMultiCallable[pb.SessionsRequest, bytes]
SessionsCall = grpc.aio.StreamStreamCall[pb.SessionsRequest, bytes]


def sessions_method(channel: grpc.aio.Channel) -> SessionsMethod:
    """Responses as raw bytes: the stream parses them itself (a bad one fails the stream)."""
    return channel.stream_stream(
        SESSIONS_METHOD,
        request_serializer=pb.SessionsRequest.SerializeToString,
        response_deserializer=None,
    )


Mover = Callable[["SharedSession"], "SharedStream | None"]


class SharedSession:
    """One session on a shared stream; PolicyStream's interface.

    Until the policy's first answer to it, a session keeps what it sent (at most
    REPLAY_LIMIT bytes): when its stream breaks in a way that ``status.classify``
    allows to retry (the replica went away), ``mover`` gives it another stream and
    it is sent there again, ``start.attempt`` counting up, at most OPEN_ATTEMPTS
    streams in all, as a Process stream is reopened."""

    def __init__(self, stream: SharedStream, key: int, mover: Mover | None = None) -> None:
        self._stream = stream
        self.key = key
        self._mover = mover
        self._answers: asyncio.Queue[pb.ProcessResponse | StreamFailure] = asyncio.Queue()
        self._queued = 0  # the highest sequence queued for sending
        self._over = False
        self._journal: list[pb.ProcessRequest] | None = []  # None: answered, or too much
        self._journal_bytes = 0
        self._attempts = 1
        self.failure: str | None = None

    async def send(self, request: pb.ProcessRequest, until: float) -> bool:  # noqa: ARG002
        """Queued for the stream's writer. On a session already failed (its stream broke)
        nothing is sent and True is returned all the same: ``receive`` then raises that
        failure, with its cause, instead of the caller guessing one."""
        if self._over or self._stream.broken is not None:
            return True
        self._queued = max(self._queued, request.sequence)
        if self._journal is not None:
            self._journal_bytes += request.ByteSize()
            self._journal = self._journal if self._journal_bytes <= REPLAY_LIMIT else None
            if self._journal is not None:
                self._journal.append(request)
        self._stream.queue(pb.SessionRequest(session=self.key, request=request))
        return True

    async def receive(self, until: float) -> pb.ProcessResponse:
        """The next answer, by loop time ``until``; raises TimeoutError or StreamFailure."""
        loop = asyncio.get_running_loop()
        item = await asyncio.wait_for(self._answers.get(), max(until - loop.time(), 0))
        if isinstance(item, StreamFailure):
            self._over = True
            raise item
        return item

    def deliver(self, response: pb.SessionResponse) -> None:
        """From the stream's reader: an answer or the policy's end of this session."""
        if self._over:
            return
        if response.HasField("error"):
            code = _status_code(response.error.code)
            refused = code is grpc.StatusCode.FAILED_PRECONDITION
            self.fail(
                StreamFailure(
                    f"session failed: {code.name}: {response.error.message[:200]}",
                    "refused_stream" if refused else "stream_error",
                    code=code,
                    refresh_capabilities=refused,
                )
            )
            return
        answer = response.response
        if answer.sequence > self._queued:
            # Sent before the request it names: a guess, or meant for another session.
            premature = f"the policy answered sequence {answer.sequence} before it was sent"
            self.fail(StreamFailure(premature, "invalid_reply"))
        elif self._answers.qsize() >= MAX_UNREAD:
            self.fail(StreamFailure(f"more than {MAX_UNREAD} answers unread", "invalid_reply"))
        else:
            self._journal = None  # an answer was used: a replay could not undo that
            self._answers.put_nowait(answer)

    def stream_broke(
        self, code: grpc.StatusCode | None, details: str, failure: StreamFailure
    ) -> None:
        """From the stream: it ended. Sent again elsewhere when that is allowed, else failed."""
        if (
            code is not None
            and self._mover is not None
            and self._journal is not None
            and self._attempts < OPEN_ATTEMPTS
            and classify(code, details, replied=False).retry
        ):
            stream = self._mover(self)
            if stream is not None:
                self._attempts += 1
                self._stream, self.key = stream, stream.adopt(self)
                for request in self._journal:
                    if request.HasField("start"):
                        request = _with_attempt(request, self._attempts - 1)  # noqa: PLW2901
                    stream.queue(pb.SessionRequest(session=self.key, request=request))
                return
        self.fail(failure)

    def fail(self, failure: StreamFailure) -> None:
        """The session can go no further on this stream; ``receive`` raises ``failure``."""
        if self._over:
            return
        self.failure = str(failure)
        self._answers.put_nowait(failure)
        self._end(str(failure))

    def _end(self, reason: str) -> None:
        self._over = True
        self._stream.end(self.key, reason)

    async def close(self) -> None:
        """The SMTP session is over: the policy forgets it."""
        if not self._over:
            self._end("quit")

    def cancel(self) -> None:
        """On failure: the policy is told the session is over; later answers are dropped."""
        if not self._over:
            self._end("the bridge gave up on the session")


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


class SharedStream:
    def __init__(
        self,
        method: SessionsMethod,
        metadata: Metadata = (),
        on_replica: Callable[[str], object] | None = None,
    ) -> None:
        self._call: SessionsCall = method(None, wait_for_ready=True, metadata=metadata)
        self._status = StatusRecord(self._call)
        self._on_replica = on_replica
        self._sessions: dict[int, SharedSession] = {}
        self._keys = itertools.count(1)
        self._outgoing: list[pb.SessionRequest] = []
        self._ready = asyncio.Event()
        self._replied = False
        self.broken: StreamFailure | None = None
        self._writer = asyncio.ensure_future(self._write())
        self._reader = asyncio.ensure_future(self._read())

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def open_session(self, mover: Mover | None = None) -> SharedSession:
        session = SharedSession(self, next(self._keys), mover)
        self._sessions[session.key] = session
        return session

    def adopt(self, session: SharedSession) -> int:
        """A session moved here from a broken stream: its key on this one."""
        key = next(self._keys)
        self._sessions[key] = session
        return key

    def queue(self, item: pb.SessionRequest) -> None:
        self._outgoing.append(item)
        self._ready.set()

    def end(self, key: int, reason: str) -> None:
        """A session is over: forgotten here, and the policy is told."""
        if self._sessions.pop(key, None) is not None and self.broken is None:
            self.queue(pb.SessionRequest(session=key, end=pb.SessionEnd(reason=reason[:200])))

    async def _write(self) -> None:
        call = self._call
        with contextlib.suppress(*_CALL_ERRORS):
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._outgoing:
                    batch: list[pb.SessionRequest] = []
                    size = 0
                    for item in self._outgoing:
                        size += item.ByteSize()
                        if batch and size > MAX_BATCH_BYTES:
                            break
                        batch.append(item)
                    del self._outgoing[: len(batch)]
                    await call.write(pb.SessionsRequest(requests=batch))

    async def _read(self) -> None:
        call = self._call
        try:
            if self._on_replica is not None:
                self._on_replica(replica_of(await call.initial_metadata()))
            while (data := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                assert isinstance(data, bytes)
                try:
                    message = pb.SessionsResponse.FromString(data)
                except DecodeError:
                    self._break(
                        StreamFailure("a reply that is not a SessionsResponse", "invalid_reply")
                    )
                    return
                for response in message.responses:
                    session = self._sessions.get(response.session)
                    if session is not None:  # else: a session already over
                        self._replied = True
                        session.deliver(response)
            self._break(StreamFailure("the policy ended the stream", "stream_error"))
        except _CALL_ERRORS:
            code, details = self._status.code, self._status.details
            if code is None:
                self._break(StreamFailure("stream cancelled", "stream_error"))
            else:
                failure = _failure(code, details, classify(code, details, replied=True))
                self._break(failure, code, details)

    def _break(
        self, failure: StreamFailure, code: grpc.StatusCode | None = None, details: str = ""
    ) -> None:
        """The stream is over: each session on it moves or fails; the call is cancelled."""
        if self.broken is None:
            self.broken = failure
        sessions = list(self._sessions.values())
        self._sessions.clear()
        self._call.cancel()
        self._writer.cancel()
        for session in sessions:
            session.stream_broke(code, details, failure)

    async def close(self, timeout: float = 10.0) -> None:
        """Normal end, once no session is left: half-close and read to the end."""
        self._writer.cancel()
        with contextlib.suppress(*_CALL_ERRORS):
            if self._outgoing:
                await self._call.write(pb.SessionsRequest(requests=self._outgoing))
            await self._call.done_writing()
        await asyncio.wait([self._reader], timeout=timeout)
        if not self._reader.done():
            self._call.cancel()
            await asyncio.wait([self._reader], timeout=timeout)

    def cancel(self) -> None:
        self._call.cancel()
