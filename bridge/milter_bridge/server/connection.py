"""One MTA connection: socket -> session -> policy stream -> socket.

The session decides everything; this module only moves bytes and messages,
keeps time, and applies the failure action when the policy cannot answer:
unreachable, slower than the stage's deadline, a broken or refused stream,
or an answer the session refuses. After a failure the stream is cancelled
and the session told (``policy_failed``): it sends nothing more of that
message, and its next message opens a new stream (it starts mid-session).

Each stage's deadline counts from when the MTA's command was read, and
bounds opening the stream, handing the event over and the answer. While end
of message waits, the MTA gets SMFIR_PROGRESS every ``progress_interval``
seconds, also while the request is still being written; a policy's own
progress is forwarded at most once a second.

All replies to one read from the MTA go out in one write: libmilter's two
writes at end of message cost ~40 ms a message through Nagle and delayed ACK.
Nothing is read from the MTA while the policy is deciding, as in libmilter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, MutableMapping
from typing import Any

from milter_bridge.config import Config
from milter_bridge.metrics import Metrics
from milter_bridge.protocol.errors import InvalidAnswer, InvalidModification, ProtocolError
from milter_bridge.session import (
    EndPolicyStream,
    Output,
    Pending,
    Plan,
    ProgressToMta,
    SendToMta,
    SendToPolicy,
    Session,
    Stage,
)
from milter_bridge.session.journal import MAX_REPLAYS
from milter_bridge.upstream.capabilities import CapabilitiesCache
from milter_bridge.upstream.channel import ProcessMethod
from milter_bridge.upstream.pool import SharedStreams
from milter_bridge.upstream.security import Metadata, no_metadata
from milter_bridge.upstream.shared import SharedSession
from milter_bridge.upstream.stream import CLOSE_TIMEOUT, PolicyStream, StreamFailure
from milter_bridge.v1 import policy_pb2 as pb

READ_SIZE = 1 << 16
# A policy's own progress reaches the MTA at most this often: one keeps it waiting.
PROGRESS_GAP = 1.0
MTA_WRITE_TIMEOUT = 60.0
log = logging.getLogger("milter_bridge.connection")


class ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """Gives every line the connection and, once known, the MTA's queue id.

    As fields (``conn``, ``qid``, and ``log_prefix`` for plain lines), never in
    the message: the queue id comes from the MTA and must not reach a format
    string (logs.py).
    """

    def __init__(self, conn_id: str) -> None:
        super().__init__(log, {})
        self.conn_id = conn_id
        self.session: Session | None = None

    def process(
        self, msg: object, kwargs: MutableMapping[str, Any]
    ) -> tuple[object, MutableMapping[str, Any]]:
        qid = self.session.queue_id if self.session is not None else None
        prefix = f"conn={self.conn_id}" + (f" qid={qid}" if qid else "") + ": "
        extra = {"conn": self.conn_id, "qid": qid or None, "log_prefix": prefix}
        kwargs["extra"] = extra | dict(kwargs.get("extra") or {})
        return msg, kwargs


class MtaConnection:
    def __init__(  # noqa: PLR0917 - one connection's collaborators
        self,
        conn_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: Config,
        capabilities: CapabilitiesCache,
        process: ProcessMethod,
        metrics: Metrics,
        metadata: Callable[[], Metadata] = no_metadata,
        channel_ready: Callable[[], bool] = lambda: True,
        shared: SharedStreams | None = None,
    ) -> None:
        self.conn_id = conn_id
        self._shared = shared  # --policy-streams: sessions on long-lived streams
        self._channel_ready = channel_ready
        self._metadata = metadata
        self._metrics = metrics
        # When the current message began (first bytes read after the last one ended).
        self._message_started: float | None = None
        self._reader = reader
        self._writer = writer
        self._config = config
        self._capabilities = capabilities
        self._process = process
        self.log = ConnectionLog(conn_id)
        self._stream: PolicyStream | SharedSession | None = None
        self._stream_id = 0  # the session's number of self._stream
        self._decision_started = 0.0
        self._asked: Pending | None = None  # the last event handed over for an answer
        self._last_progress = -math.inf  # when the MTA last got SMFIR_PROGRESS
        # The least time between two SMFIR_PROGRESS; also how often waits tick.
        self._progress_gap = min(PROGRESS_GAP, config.progress_interval)
        self._closing: set[asyncio.Task[None]] = set()
        self._left_replica: str | None = None  # a replayed session goes elsewhere
        self.session: Session | None = None

    async def run(self) -> None:
        try:
            await self._serve()
        except ProtocolError as exc:
            self.log.warning("closing the connection: the MTA broke the protocol: %s", exc)
        except (ConnectionError, TimeoutError) as exc:
            self.log.info("connection lost: %s", exc or type(exc).__name__)
        except asyncio.CancelledError:
            # Shutdown after the grace period: what awaits the policy gets the failure action.
            await self._answer_before_closing()
            raise
        finally:
            if self._stream is not None:
                self._stream.cancel()
            # The MTA's socket first: its connection is over, whatever the policy does.
            self._writer.close()
            if self._closing:
                await asyncio.wait(self._closing, timeout=2 * CLOSE_TIMEOUT)

    async def _answer_before_closing(self) -> None:
        session = self.session
        if session is None or session.pending is None:
            return
        stage = session.pending.stage
        action = self._config.failure_actions[stage]
        self.log.warning("shutting down: answering %s at %s", action.name.lower(), stage.value)
        for output in session.fail(action):
            if isinstance(output, SendToMta):
                self._writer.write(output.data)
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(self._writer.drain(), 1.0)

    async def _read_mta(self) -> bytes:
        """The next bytes from the MTA; an MTA silent for the idle timeout is gone."""
        idle = self._config.mta_idle_timeout
        try:
            async with asyncio.timeout(idle):  # no task per read, as wait_for would make
                return await self._reader.read(READ_SIZE)
        except TimeoutError:
            self.log.warning("the MTA sent nothing for %gs: closing", idle)
            return b""

    async def _serve(self) -> None:
        data = await self._read_mta()
        if not data:
            return
        plan = await self._capabilities.plan(self._config.describe_wait)
        if plan is None:
            self.log.warning("no policy capabilities known: negotiating the minimum")
            plan = Plan.unavailable()
        config = self._config
        session = Session(
            plan,
            connection_id=self.conn_id,
            max_packet_size=config.max_packet_size,
            max_body_buffer=config.max_body_buffer,
            max_header_buffer=config.max_header_buffer,
            max_headers=config.max_headers,
            max_recipients=config.max_recipients,
            max_recipient_buffer=config.max_recipient_buffer,
            replays=MAX_REPLAYS if self._shares(plan) else 0,
        )
        self.session = self.log.session = session
        self.log.debug("connected")
        loop = asyncio.get_running_loop()
        while data:
            read_at = loop.time()
            if self._message_started is None:
                self._message_started = read_at
            await self._carry_out(session.feed(data), read_at)
            while session.pending is not None:
                await self._await_policy(session)
            if session.finished:
                break
            data = await self._read_mta()
        else:
            if session.decoder.frames.buffered:
                self.log.warning(
                    "the MTA closed the connection inside a packet (%d bytes of it read)",
                    session.decoder.frames.buffered,
                )
            await self._carry_out(session.connection_lost(), loop.time())
        self.log.debug("closed")

    def _shares(self, plan: Plan) -> bool:
        """Sessions ride on shared streams: the bridge has them and the policy serves them."""
        return self._shared is not None and plan.capabilities.shared_streams

    async def _carry_out(self, outputs: list[Output], started: float) -> None:
        """``started``: when what caused the outputs happened (stage deadlines count from it)."""
        to_mta = bytearray()
        for output in outputs:
            if isinstance(output, SendToMta):
                to_mta += output.data
            elif isinstance(output, SendToPolicy):
                await self._send_to_policy(output, started)
            elif isinstance(output, ProgressToMta):
                now = asyncio.get_running_loop().time()
                if now - self._last_progress >= self._progress_gap:
                    self._last_progress = now
                    self._metrics.progress_sent.inc()
                    to_mta += output.data
            elif isinstance(output, EndPolicyStream) and output.stream == self._stream_id:
                if isinstance(self._stream, SharedSession):
                    self._stream.end()
                elif self._stream is not None:
                    task = asyncio.create_task(self._stream.close(), name="stream-close")
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
                self._stream = None
        if to_mta:
            self._writer.write(to_mta)
            # An MTA that stops reading would hold this connection forever.
            async with asyncio.timeout(MTA_WRITE_TIMEOUT):
                await self._writer.drain()

    async def _send_to_policy(self, output: SendToPolicy, started: float) -> None:
        session = self.session
        if session is None or output.stream == session.failed_stream:
            return  # that stream failed while these outputs were carried out
        if output.stream != self._stream_id:
            # The session's first request of a new stream is its `start`.
            self._stream_id = output.stream
            if self._shared is not None and self._shares(session.plan):
                self._stream = self._shared.open_session(
                    self._left_replica, self._keep_mta_waiting, self._progress_gap
                )
                self._left_replica = None  # only the replayed conversation avoids it
            else:
                self._stream = PolicyStream(
                    self._process,
                    self.log,
                    self._metrics.stream_retries.inc,
                    self._metadata,
                    self._count_replica,
                    self._keep_mta_waiting,
                    self._progress_gap,
                )
                self._metrics.streams.inc()
        assert self._stream is not None
        request = output.request
        kind = request.WhichOneof("event")
        if kind != "start":
            self._metrics.events_sent.labels(kind).inc()
        timeout = self._deadline(output.stage)
        if request.reply_expected:
            # The stage's deadline covers opening the stream, the event and the answer.
            self._decision_started = started
            self._asked = session.pending
        if not await self._stream.send(request, started + timeout):
            # wait_for_ready: a policy that cannot be reached is waited for until the
            # deadline; one that is connected but does not read its stream is stuck.
            if self._channel_ready():
                reason, cause = f"the policy took no request for {timeout:g}s", "timeout"
            else:
                reason, cause = (
                    f"the policy could not be reached within {timeout:g}s",
                    "unreachable",
                )
            self.log.warning("%s: cancelling its stream", reason)
            self._drop_stream(session, reason, cause)

    def _count_replica(self, replica: str) -> None:
        """A Process stream reached ``replica``: a stream, and a session's conversation."""
        self._metrics.replica_streams.labels(replica).inc()
        self._metrics.replica_sessions.labels(replica).inc()

    def _deadline(self, stage: Stage) -> float:
        # ABORT is only observed: it is handed over within the connect stage's deadline.
        return self._config.deadlines.get(stage, self._config.deadlines[Stage.CONNECT])

    async def _keep_mta_waiting(self) -> None:
        """Called while the policy is waited on: SMFIR_PROGRESS when end of message is due one."""
        session = self.session
        if session is None or session.pending is None or session.pending.stage is not Stage.EOM:
            return
        due = max(self._decision_started, self._last_progress) + self._config.progress_interval
        if asyncio.get_running_loop().time() >= due:
            await self._carry_out(session.progress(), due)

    def _drop_stream(self, session: Session, reason: str, cause: str) -> None:
        stream = 0
        if self._stream is not None:
            self._stream.cancel()
            self._stream, stream = None, self._stream_id
        session.policy_failed(stream, reason, cause)

    async def _await_policy(self, session: Session) -> None:
        pending = session.pending
        assert pending is not None
        failure, stream = session.policy_failure, self._stream
        if failure is not None or stream is None:
            # Nothing was sent: no capabilities known, or the policy failed on this message.
            reason, cause = failure or ("the policy stream is gone", "stream_error")
            await self._fail(session, reason, cause)
            return
        deadline_s = self._config.deadlines[pending.stage]
        deadline = self._decision_started + deadline_s
        while session.pending is pending:
            try:
                response = await stream.receive(deadline)
            except TimeoutError:
                if isinstance(stream, SharedSession) and stream.timed_out():
                    self.log.warning(
                        "shared stream to replica %s silent for %gs: no new sessions on it",
                        stream.replica,
                        deadline_s,
                    )
                await self._fail(session, f"no answer within {deadline_s:g}s", "timeout")
                return
            except StreamFailure as exc:
                replayed = await self._replay(session, exc) if exc.replayable else None
                if replayed is not None:
                    stream = replayed
                    continue
                if exc.refresh_capabilities:
                    self._capabilities.refresh_now()
                await self._fail(session, str(exc), exc.cause)
                return
            if not await self._take_answer(session, response):
                return

    async def _replay(
        self, session: Session, failure: StreamFailure
    ) -> PolicyStream | SharedSession | None:
        """The shared stream broke because its replica went away: the session's
        conversation again on another stream, within the same deadline; that stream,
        or None when the session cannot be replayed."""
        outputs = session.replay(self._stream_id)
        if not outputs:
            return None
        old = self._stream
        if isinstance(old, SharedSession):
            self._left_replica = old.replica
        self._stream = None
        self._metrics.stream_retries.inc()
        self.log.info(
            "policy stream broke (%s): replaying the session on another (attempt %d)",
            failure,
            session.replayed,
        )
        await self._carry_out(outputs, self._decision_started)
        return self._stream

    async def _take_answer(self, session: Session, response: pb.ProcessResponse) -> bool:
        """Apply one policy answer; False when it was refused and the failure action ran."""
        pending = session.pending
        assert pending is not None
        try:
            outputs = session.answer(response)
        except InvalidModification as exc:
            await self._fail(session, f"invalid answer: {exc}", "refused_modification")
            return False
        except InvalidAnswer as exc:
            await self._fail(session, f"invalid answer: {exc}", "invalid_reply")
            return False
        now = asyncio.get_running_loop().time()
        if session.pending is not pending:  # final, not progress
            self._count_answer(pending.stage, response, now)
        await self._carry_out(outputs, now)
        return True

    def _count_answer(self, stage: Stage, response: pb.ProcessResponse, now: float) -> None:
        eom = response.HasField("end_of_message")
        final = response.end_of_message.verdict if eom else response.verdict
        # An unset action means continue (policy.proto), and is counted so.
        action = pb.Action.Name(final.action or pb.ACTION_CONTINUE).removeprefix("ACTION_").lower()
        self._metrics.decisions.labels(stage.value, action).inc()
        self._metrics.policy_latency.labels(stage.value).observe(now - self._decision_started)
        if stage is Stage.EOM:
            self._message_ended(action, now)
        elif action not in ("continue", "skip"):
            # A decision before end of message that ends the message or the session.
            latency_ms = self._policy_ms(now)
            self.log.info(
                "%s: %s (policy %.1f ms)",
                stage.value,
                action,
                latency_ms,
                extra={"stage": stage.value, "verdict": action, "latency_ms": latency_ms},
            )

    def _policy_ms(self, now: float, *, asked: bool = True) -> float:
        """Milliseconds since the pending event was handed to the policy (for log lines);
        0 when it never was (the policy failed earlier in the message)."""
        return round((now - self._decision_started) * 1000, 1) if asked else 0.0

    def _message_ended(self, verdict: str, now: float, *, asked: bool = True) -> None:
        self._metrics.messages.labels(verdict).inc()
        latency_ms = self._policy_ms(now, asked=asked)
        message_ms = None
        if self._message_started is not None:
            self._metrics.message_duration.observe(now - self._message_started)
            message_ms = round((now - self._message_started) * 1000, 1)
        self._message_started = None
        # One line per message: what was answered and how long the policy took.
        self.log.info(
            "end of message: %s (policy %.1f ms, message %s ms)",
            verdict,
            latency_ms,
            message_ms,
            extra={"stage": "end_of_message", "verdict": verdict, "latency_ms": latency_ms},
        )

    async def _fail(self, session: Session, reason: str, cause: str) -> None:
        pending = session.pending
        assert pending is not None
        action = self._config.failure_actions[pending.stage]
        self._metrics.failure_actions.labels(pending.stage.value, cause).inc()
        if pending.stage is Stage.EOM:
            now = asyncio.get_running_loop().time()
            self._message_ended(action.name.lower(), now, asked=self._asked is pending)
        self.log.warning(
            "policy failure at %s: %s; answering %s",
            pending.stage.value,
            reason,
            action.name.lower(),
            extra={"stage": pending.stage.value, "verdict": action.name.lower(), "cause": cause},
        )
        self._drop_stream(session, f"failed at {pending.stage.value}: {reason}", cause)
        await self._carry_out(session.fail(action), asyncio.get_running_loop().time())
