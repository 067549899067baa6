"""One Process stream's requests -> handler calls -> answers. Used by serve() and testing.

No gRPC here: requests in, responses out. A plain handler runs in the policy's
thread pool; an exception in a handler is logged with its traceback and
answered with the policy's error verdict, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from milter_bridge.v1 import policy_pb2 as pb
from milter_policy.context import Context, Envelope, family_name
from milter_policy.policy import Policy

log = logging.getLogger("milter_policy")

__all__ = ["Dispatcher"]


class Dispatcher:
    def __init__(
        self,
        policy: Policy,
        executor: Executor | None,
        on_progress: Callable[[pb.ProcessResponse], None] | None = None,
    ) -> None:
        self.policy = policy
        self.executor = executor
        self.ctx = Context()
        self._on_progress = on_progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress_sequence = 0

    async def handle(self, request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        """The responses to one request (none for observed events)."""
        ctx = self.ctx
        event = request.WhichOneof("event")
        ctx._enter_stage(str(event), dict(request.macros))
        if event == "start":
            ctx.connection_id = request.start.session_id
            ctx.protocol_version = request.start.negotiated.protocol_version
            ctx.attempt = request.start.attempt
            ctx._granted = request.start.negotiated.actions
            return []
        ctx.decided = None
        if request.HasField("decided"):
            action = request.decided.action or pb.ACTION_CONTINUE
            ctx.decided = pb.Action.Name(action).removeprefix("ACTION_").lower()
        calls = self._prepare(event, request)
        ctx._verdict, ctx._modifications = None, []
        failed = False
        for name, args in calls:
            if not await self._call(request.sequence, name, args):
                failed = True
                break
        if event in ("abort", "end_of_message"):
            self._new_message()  # the next message starts clean (also without mail_from)
        if not request.reply_expected:
            return []
        return [self._answer(request, at_eom=event == "end_of_message", failed=failed)]

    async def close(self) -> None:
        """The stream ended: the close handler, if any."""
        self.ctx.decided = None
        await self._call(0, "close", ())

    def _prepare(  # noqa: PLR0911 - one branch per event
        self, event: str | None, request: pb.ProcessRequest
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """Update the context for the event; the handler calls it leads to."""
        ctx = self.ctx
        if event == "connect":
            c = request.connect
            ctx.client.hostname, ctx.client.address, ctx.client.port = c.hostname, c.address, c.port
            ctx.client.family = family_name(c.family)
            return [("connect", ())]
        if event == "helo":
            ctx.helo = request.helo.name
            return [("helo", (request.helo.name,))]
        if event == "mail_from":
            m = request.mail_from
            self._new_message()
            ctx.envelope.sender, ctx.envelope.sender_args = m.address, list(m.esmtp_args)
            return [("mail_from", (m.address, list(m.esmtp_args)))]
        if event == "rcpt_to":
            r = request.rcpt_to
            ctx.envelope.recipients.append(r.address)
            return [("rcpt_to", (r.address, list(r.esmtp_args)))]
        if event == "data":
            return [("data", ())]
        if event == "header":
            ctx.headers.append((request.header.name, request.header.value))
            return [("header", (request.header.name, request.header.value))]
        if event == "end_of_headers":
            batch = [(h.name, h.value) for h in request.end_of_headers.headers]
            ctx.headers.extend(batch)
            ctx.headers_truncated = request.end_of_headers.headers_truncated
            return [*(("header", h) for h in batch), ("end_of_headers", ())]
        if event == "body_chunk":
            return [("body", (request.body_chunk.data,))]
        if event == "end_of_message":
            self._fill_from_end_of_message(request.end_of_message)
            return [("end_of_message", ())]
        if event == "unknown":
            return [("unknown", (request.unknown.command,))]
        if event == "abort":
            return [("abort", ())]
        return []

    def _new_message(self) -> None:
        ctx = self.ctx
        ctx.envelope = Envelope()
        ctx.headers, ctx.headers_truncated = [], False
        ctx.body, ctx.body_truncated = b"", False

    def _fill_from_end_of_message(self, eom: pb.EndOfMessage) -> None:
        ctx = self.ctx
        if self.policy.eom_headers:
            ctx.headers = [(h.name, h.value) for h in eom.headers]
            ctx.headers_truncated = eom.headers_truncated
        if eom.HasField("envelope"):
            e = eom.envelope
            if e.HasField("connect"):
                ctx.client.hostname, ctx.client.address = e.connect.hostname, e.connect.address
                ctx.client.port, ctx.client.family = e.connect.port, family_name(e.connect.family)
            if e.HasField("helo"):
                ctx.helo = e.helo.name
            ctx.envelope = Envelope(
                sender=e.mail_from.address,
                sender_args=list(e.mail_from.esmtp_args),
                recipients=[r.address for r in e.recipients],
                recipients_truncated=e.recipients_truncated,
            )
            for stage, macros in e.macros.items():
                ctx._replace_stage(stage, dict(macros.values))
        if self.policy.eom_body:
            ctx.body, ctx.body_truncated = eom.body, eom.body_truncated

    async def _call(self, sequence: int, name: str, args: tuple[Any, ...]) -> bool:
        """Run one handler; False when it raised (the error verdict then applies)."""
        registered = self.policy.handlers.get(name)
        if registered is None:
            return True
        ctx = self.ctx
        ctx._event = name
        self._progress_for(sequence)
        try:
            if inspect.iscoroutinefunction(registered.func):
                await registered.func(ctx, *args)
            else:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.executor, lambda: registered.func(ctx, *args))
        except Exception:
            log.exception(
                "%s: the %s handler raised; answering %s",
                ctx.connection_id or "test",
                name,
                pb.Action.Name(self.policy.error_action).removeprefix("ACTION_").lower(),
            )
            return False
        finally:
            ctx._event = ""
        return True

    def _progress_for(self, sequence: int) -> None:
        """Make ctx.progress() send at once, also from a handler's thread. Only the
        event's number is kept here: the response is made when a handler asks."""
        self._progress_sequence = sequence
        if self._on_progress is None:
            self.ctx._send_progress = None
        elif self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.ctx._send_progress = self._send_progress

    def _send_progress(self) -> None:
        send, loop = self._on_progress, self._loop
        assert send is not None
        assert loop is not None
        response = pb.ProcessResponse(sequence=self._progress_sequence, progress=pb.Progress())
        loop.call_soon_threadsafe(send, response)

    def _answer(
        self, request: pb.ProcessRequest, *, at_eom: bool, failed: bool
    ) -> pb.ProcessResponse:
        ctx = self.ctx
        if failed:
            verdict = pb.Verdict(action=self.policy.error_action)
            mods: list[pb.Modification] = []
        else:
            verdict = ctx._verdict or pb.Verdict(action=pb.ACTION_CONTINUE)
            mods = ctx._modifications
        if at_eom:
            eom = pb.EndOfMessageResponse(modifications=mods, verdict=verdict)
            return pb.ProcessResponse(sequence=request.sequence, end_of_message=eom)
        return pb.ProcessResponse(sequence=request.sequence, verdict=verdict)
