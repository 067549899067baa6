"""SharedPolicyService.Sessions: many SMTP sessions on one long-lived stream.

Each session gets the Dispatcher a Process stream would get and a task of its
own that takes its requests in order, so that one session's slow handler never
delays another's. Whatever the sessions have to say is collected in one queue
and written as few SessionsResponse messages as there are moments something is
ready. A failure of one session (a refusal by fingerprint, a request that
cannot begin a session) ends that session only, with a SessionError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

import grpc
import grpc.aio

from milter_bridge.v1 import policy_pb2 as pb
from milter_bridge.v1 import policy_pb2_grpc
from milter_policy.dispatch import Dispatcher
from milter_policy.policy import Policy

log = logging.getLogger("milter_policy")

_END = object()  # the stream's end: every session is over
_DRAINING = object()  # the policy shuts down: the bridge sends no new sessions here
_Out = asyncio.Queue[pb.SessionResponse | object]


class _Session:
    """One session of a shared stream: its dispatcher, its requests in order."""

    def __init__(self, key: int, dispatcher: Dispatcher, out: _Out) -> None:
        self.key = key
        self.dispatcher = dispatcher
        self.out = out
        self.requests: asyncio.Queue[pb.ProcessRequest | None] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while (request := await self.requests.get()) is not None:
            try:
                responses = await self.dispatcher.handle(request)
            except Exception as exc:  # the dispatcher's own failure, not a handler's
                log.exception("session %d failed", self.key)
                self.out.put_nowait(_error(self.key, grpc.StatusCode.INTERNAL, repr(exc)))
                return
            for response in responses:
                self.out.put_nowait(pb.SessionResponse(session=self.key, response=response))
        await self.dispatcher.close()


def _error(key: int, code: grpc.StatusCode, message: str) -> pb.SessionResponse:
    number: int = code.value[0]
    return pb.SessionResponse(session=key, error=pb.SessionError(code=number, message=message))


class SharedService(policy_pb2_grpc.SharedPolicyServiceServicer):
    def __init__(
        self,
        policy: Policy,
        executor: Executor,
        fingerprint: str,
        replica: Callable[[], str],
    ) -> None:
        self.policy = policy
        self.executor = executor
        self.fingerprint = fingerprint
        self.replica = replica  # known once the server has its port
        self._calls: set[_Out] = set()
        self.draining = False

    def drain(self) -> None:
        """Shutting down: each stream tells the bridge to send its new sessions elsewhere
        (SessionsResponse.draining); the sessions on it go on until the bridge ends them."""
        self.draining = True
        for out in self._calls:
            out.put_nowait(_DRAINING)

    async def Sessions(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.SessionsRequest],
        context: grpc.aio.ServicerContext[pb.SessionsRequest, pb.SessionsResponse],
    ) -> AsyncIterator[pb.SessionsResponse]:
        await context.send_initial_metadata((("milter-policy-replica", self.replica()),))
        out: _Out = asyncio.Queue()
        self._calls.add(out)
        if self.draining:
            out.put_nowait(_DRAINING)
        sessions: dict[int, _Session | None] = {}  # None: refused, its requests dropped
        tasks: set[asyncio.Future[None]] = set()  # of every session, ended ones included
        consumer = asyncio.ensure_future(self._consume(request_iterator, sessions, tasks, out))
        try:
            while (item := await out.get()) is not _END:
                # One more turn of the loop, so that answers other sessions are finishing
                # in it go out in the same message.
                await asyncio.sleep(0)
                batch = [item]
                while not out.empty() and (item := out.get_nowait()) is not _END:
                    batch.append(item)
                draining = _DRAINING in batch
                responses = [r for r in batch if isinstance(r, pb.SessionResponse)]
                yield pb.SessionsResponse(responses=responses, draining=draining)
                if item is _END:
                    break
        finally:
            self._calls.discard(out)
            consumer.cancel()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer

    async def _consume(
        self,
        request_iterator: AsyncIterator[pb.SessionsRequest],
        sessions: dict[int, _Session | None],
        tasks: set[asyncio.Future[None]],
        out: _Out,
    ) -> None:
        try:
            async for batch in request_iterator:
                for item in batch.requests:
                    session = self._take(item, sessions, out)
                    if session is not None:
                        tasks.add(session.task)
                        session.task.add_done_callback(tasks.discard)
            # The bridge half-closed: every session still open is over. The call ends
            # once every session has ended, those the bridge ended before included.
            for open_session in sessions.values():
                if open_session is not None:
                    open_session.requests.put_nowait(None)
            await asyncio.gather(*tasks)
        finally:
            out.put_nowait(_END)

    def _take(
        self, item: pb.SessionRequest, sessions: dict[int, _Session | None], out: _Out
    ) -> _Session | None:
        """Hand one request to its session; the session when this began it."""
        key = item.session
        if item.HasField("end"):
            session = sessions.pop(key, None)
            if session is not None:
                session.requests.put_nowait(None)
            return None
        if key in sessions:
            session = sessions[key]
            if session is not None:
                session.requests.put_nowait(item.request)
            return None
        request = item.request
        if not request.HasField("start"):
            sessions[key] = None
            message = "a session's first request must be start"
            out.put_nowait(_error(key, grpc.StatusCode.INVALID_ARGUMENT, message))
            return None
        if request.start.fingerprint not in ("", self.fingerprint):
            sessions[key] = None
            message = "the policy's capabilities changed"
            out.put_nowait(_error(key, grpc.StatusCode.FAILED_PRECONDITION, message))
            return None
        log.debug("session %s", request.start.session_id)
        dispatcher = Dispatcher(
            self.policy,
            self.executor,
            on_progress=lambda response: out.put_nowait(
                pb.SessionResponse(session=key, response=response)
            ),
        )
        session = sessions[key] = _Session(key, dispatcher, out)
        session.requests.put_nowait(request)
        return session
