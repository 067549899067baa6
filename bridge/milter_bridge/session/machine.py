"""The per-connection milter session: MTA bytes in, MTA bytes and policy messages out.

No I/O. The connection layer feeds what it reads from the MTA into
``feed()``, hands policy answers to ``answer()`` (or ``fail()`` when the
policy is broken or late) and carries out the returned outputs in order:

    SendToMta(data)       write to the MTA; all replies to one command are one write
    ProgressToMta(data)   SMFIR_PROGRESS while end of message awaits the policy; the
                          connection may leave some out (it rate-limits them)
    SendToPolicy(request, stream, stage)
                          send on policy stream ``stream``; the first request of every
                          stream is `start`. Left out when ``stream`` is
                          ``Session.failed_stream`` (it failed while the outputs were
                          carried out); ``stage``'s deadline bounds handing it over
    EndPolicyStream(stream)
                          half-close that policy stream: the SMTP session is over

At most one event awaits the policy (``pending``): the MTA waits for that
answer, and whatever it sends meanwhile (ABORT or QUIT after its own
timeout) is queued and handled after the answer, as libmilter, which reads
the next command only after replying, would handle it.

When the policy fails (``policy_failed()``: unreachable, late, a broken or
refused stream, an invalid answer), the session owns what follows: nothing
more of that message goes to any stream, each later event of it that awaits
an answer is pending with ``policy_failure`` set (the connection answers it
with the stage's failure action at once), and the next message opens a new
stream that begins with `start`.

The message being assembled is one ``message.Message``, replaced at each
reset (MAIL FROM, the answer to end of message, ABORT, a new SMTP session).

On a shared stream (``replays`` > 0) a stream that broke because its replica
went away is not a failure yet: ``replay()`` gives the conversation again on
a new stream (journal.py), the answered events as decided; only when it
cannot (too many replays, too much kept) does ``policy_failed`` follow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from google.protobuf.message import Message as ProtoMessage

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import constants as c
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE, CommandDecoder, encode, encode_all
from milter_bridge.protocol.constants import MacroStage
from milter_bridge.protocol.errors import InvalidAnswer, ProtocolError
from milter_bridge.session import answers, events
from milter_bridge.session.journal import Journal
from milter_bridge.session.macros import MacroStore
from milter_bridge.session.message import Limits, Message
from milter_bridge.session.negotiation import Negotiation, negotiate
from milter_bridge.session.plan import Body, Plan
from milter_bridge.session.stages import (
    ENVELOPE_MACROS,
    MESSAGE_STAGES,
    ROW,
    STATE_OF_STAGE,
    Mode,
    Stage,
)
from milter_bridge.session.states import (
    KEEPS_STATE_ON_REJECT,
    STATE_OF,
    State,
    in_mail,
    transition_ok,
)
from milter_bridge.v1 import policy_pb2 as pb

DEFAULT_MAX_BODY_BUFFER = 16 << 20
DEFAULT_MAX_HEADER_BUFFER = 1 << 20
DEFAULT_MAX_HEADERS = 1000
DEFAULT_MAX_RECIPIENTS = 1000
DEFAULT_MAX_RECIPIENT_BUFFER = 1 << 20

# Commands an MTA may send while it waits for an answer (ABORT, QUIT after its
# own timeout); more than this many means it does not wait at all.
MAX_QUEUED_COMMANDS = 16


def _skippable(plan: Plan) -> frozenset[State]:
    """The states the MTA may skip: those of events the plan does not need (once per plan)."""
    return plan.remember(
        "skippable",
        lambda: frozenset(
            st for stage, st in STATE_OF_STAGE.items() if not plan.needs_from_mta(stage)
        ),
    )


@dataclass(frozen=True, slots=True)
class SendToMta:
    data: bytes


_PROGRESS = encode(r.Progress())


@dataclass(frozen=True, slots=True)
class ProgressToMta:
    data: bytes = _PROGRESS


@dataclass(frozen=True, slots=True)
class SendToPolicy:
    request: pb.ProcessRequest
    stream: int
    stage: Stage


@dataclass(frozen=True, slots=True)
class EndPolicyStream:
    stream: int


Output = SendToMta | ProgressToMta | SendToPolicy | EndPolicyStream


@dataclass(frozen=True, slots=True)
class Pending:
    """The event that awaits the policy's answer."""

    sequence: int
    stage: Stage
    command: bytes


class FailureAction(Enum):
    """What to answer the MTA when the policy cannot (configured per stage)."""

    TEMPFAIL = pb.ACTION_TEMPFAIL
    REJECT = pb.ACTION_REJECT
    ACCEPT = pb.ACTION_ACCEPT
    CONTINUE = pb.ACTION_CONTINUE


_CONTINUE = encode(r.Continue())


class Session:
    """One MTA milter connection (possibly several SMTP sessions with QUIT_NC)."""

    def __init__(
        self,
        plan: Plan,
        *,
        connection_id: str = "",
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_body_buffer: int = DEFAULT_MAX_BODY_BUFFER,
        max_header_buffer: int = DEFAULT_MAX_HEADER_BUFFER,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        max_recipient_buffer: int = DEFAULT_MAX_RECIPIENT_BUFFER,
        replays: int = 0,
    ) -> None:
        self.plan = plan
        # On a shared stream: how often a conversation may be replayed (journal.py).
        self._max_replays = replays
        self._journal: Journal | None = None
        self._replays = 0
        # Memory per connection: a buffered body and the headers collected for the
        # policy are cut at these sizes (the policy is told: *_truncated).
        self.limits = Limits(
            max_headers=max_headers,
            max_header_buffer=max_header_buffer,
            max_recipients=max_recipients,
            max_recipient_buffer=max_recipient_buffer,
            body_limit=min(plan.body_limit, max_body_buffer),
        )
        self.connection_id = connection_id
        self.decoder = CommandDecoder(max_packet_size)
        self.negotiation: Negotiation | None = None
        self.state = State.INIT
        self.pending: Pending | None = None
        self.finished = False  # QUIT seen: nothing more is read
        self.macros = MacroStore()
        self._queue: deque[cmd.MtaCommand] = deque()
        self._skippable = _skippable(plan)
        self.stream = 0  # the open policy stream (numbered from 1); 0: none
        self.failed_stream = 0  # the last stream that failed
        self._streams = 0
        self._sequence = 0
        self._reset_session()

    # -- inputs -------------------------------------------------------------

    def feed(self, data: bytes) -> list[Output]:
        """Bytes from the MTA; raises ProtocolError when the connection must be closed."""
        out: list[Output] = []
        try:
            commands = self.decoder.feed(data)
        except ProtocolError:
            self.finished = True
            raise
        for command in commands:
            if self.finished:
                break
            if self.pending is not None:
                if len(self._queue) >= MAX_QUEUED_COMMANDS:
                    self.finished = True
                    msg = f"MTA sent {len(self._queue) + 1} commands without waiting for an answer"
                    raise ProtocolError(msg)
                self._queue.append(command)
                continue
            out += self._handle(command)
        return out

    def answer(self, response: pb.ProcessResponse) -> list[Output]:
        """A policy answer; raises InvalidAnswer (and changes nothing) when it is not valid."""
        p = self.pending
        if p is None:
            msg = f"answer for sequence {response.sequence}, but no event awaits an answer"
            raise InvalidAnswer(msg)
        if response.sequence != p.sequence:
            msg = f"answer for sequence {response.sequence}, but {p.sequence} ({p.stage.value}) awaits it"  # noqa: E501
            raise InvalidAnswer(msg)
        kind = response.WhichOneof("response")
        if kind == "progress":
            if p.stage is not Stage.EOM:
                msg = f"answer to {p.stage.value}: progress is only valid for end_of_message"
                raise InvalidAnswer(msg)
            return [ProgressToMta()]
        if kind == "verdict":
            skip = self._negotiated().skip
            replies = answers.verdict_replies(p.stage, response.verdict, skip=skip)
            action = response.verdict.action
            if self._journal is not None:
                self._journal.decided(response.verdict)
        elif kind == "end_of_message":
            if p.stage is not Stage.EOM:
                msg = f"answer to {p.stage.value}: modifications are only valid for end_of_message"
                raise InvalidAnswer(msg)
            granted = self._negotiated().actions
            replies = answers.end_of_message_replies(response.end_of_message, granted)
            action = response.end_of_message.verdict.action
        else:
            msg = f"answer to {p.stage.value} (sequence {p.sequence}) holds no verdict"
            raise InvalidAnswer(msg)
        return self._resolve(replies, action)

    def fail(self, action: FailureAction) -> list[Output]:
        """Answer the pending event with the failure action (the policy is broken or late)."""
        p = self.pending
        if p is None:
            return []
        verdict = action.value
        if verdict == pb.ACTION_ACCEPT and p.stage is Stage.UNKNOWN:
            verdict = pb.ACTION_CONTINUE
        replies = answers.verdict_replies(p.stage, pb.Verdict(action=verdict), skip=False)
        return self._resolve(replies, verdict)

    def progress(self) -> list[Output]:
        """The bridge's own SMFIR_PROGRESS while the policy works on end of message."""
        if self.pending is None or self.pending.stage is not Stage.EOM:
            return []
        return [ProgressToMta()]

    def policy_failed(self, stream: int, reason: str, cause: str) -> None:
        """The policy failed on ``stream`` (0: none), now cancelled; ``cause``: a metric label.

        Outputs not yet carried out that name the failed stream are left out
        (``failed_stream``). When it is the open stream, or no stream is named,
        nothing more of the current message goes to the policy: what of it
        awaits an answer gets ``policy_failure``, and the next message opens a
        new stream, with `start`. The first reason of a message is kept.
        """
        if stream:
            self.failed_stream = stream
            if stream != self.stream:
                return  # an earlier stream, ended before this message began
            self.stream = 0
        if self._message.failure is None:
            self._message.failure = (reason, cause)

    def replay(self, stream: int) -> list[Output]:
        """Shared stream ``stream`` broke because its replica went away (the statuses
        ``status.classify`` retries): the conversation again on a new stream (journal.py),
        or [] when it cannot be: not the open stream, the journal past its limit, or
        replayed ``replays`` times already. Then ``policy_failed`` applies as ever."""
        journal = self._journal
        if (
            journal is None
            or stream != self.stream
            or self._message.failure is not None
            or self._replays >= self._max_replays
            or not journal.complete
        ):
            return []
        self._replays += 1
        self._streams += 1
        self.stream = self._streams
        return [SendToPolicy(req, self.stream, st) for req, st in journal.replay(self._replays)]

    @property
    def message(self) -> Message:
        """The message being assembled (message.py); a new one after each reset."""
        return self._message

    @property
    def replayed(self) -> int:
        """How often the open conversation was replayed."""
        return self._replays

    @property
    def policy_failure(self) -> tuple[str, str] | None:
        """(reason, cause) when the policy is not asked for the rest of this message."""
        if not self.plan.available:
            return ("no policy capabilities known", "unreachable")
        return self._message.failure

    def connection_lost(self) -> list[Output]:
        """The MTA closed the connection."""
        self.finished = True
        self.pending = None
        return self._end_stream()

    @property
    def queue_id(self) -> str | None:
        """The MTA's queue id (macro ``i``) once it is known, for log lines."""
        for stage in (
            MacroStage.SMFIM_EOM,
            MacroStage.SMFIM_DATA,
            MacroStage.SMFIM_ENVRCPT,
            MacroStage.SMFIM_ENVFROM,
            MacroStage.SMFIM_EOH,
        ):
            value = self.macros.value(stage, "i")
            if value:
                return value
        return None

    # -- state --------------------------------------------------------------

    def _negotiated(self) -> Negotiation:
        if self.negotiation is None:
            msg = "no option negotiation yet"
            raise ProtocolError(msg)
        return self.negotiation

    def _reset_session(self) -> None:
        self._session_accepted = False
        self._connect: pb.Connect | None = None
        self._helo: pb.Helo | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        if self._journal is not None:
            self._journal.message_over()
        self._message = Message()

    def _mode(self, stage: Stage) -> Mode:
        if self._session_accepted or (self._message.done and stage in MESSAGE_STAGES):
            return Mode.SKIP
        if stage is Stage.BODY and self._message.skip_body:
            return Mode.SKIP
        return self._negotiated().modes[stage]

    # -- commands -----------------------------------------------------------

    def _handle(self, command: cmd.MtaCommand) -> list[Output]:
        if isinstance(command, cmd.DefineMacro):
            self.macros.define(command.stage, command.macros)
            return []
        out: list[Output] = []
        new = STATE_OF[command.code]
        if isinstance(command, cmd.Quit | cmd.QuitNewConnection):
            # Always honoured (see states.py); a message in progress is aborted first.
            if in_mail(self.state):
                out += self._abort_message()
        elif not transition_ok(self.state, new, self._skippable):
            if in_mail(self.state):
                out += self._abort_message()
            self.state = State.HELO
            if not transition_ok(State.HELO, new, self._skippable):
                return out  # libmilter ignores it, without a reply
        if new is not State.UNKN:  # UNKNOWN leaves the state as it is (see states.py)
            self.state = new
        return out + self._dispatch(command)

    def _dispatch(self, command: cmd.MtaCommand) -> list[Output]:  # noqa: PLR0911, PLR0912
        match command:
            case cmd.OptionNegotiation():
                self.negotiation = negotiate(self.plan, command)
                self.macros.clear()
                return [SendToMta(encode(self.negotiation.reply))]
            case cmd.Connect():
                self.macros.entered(MacroStage.SMFIM_CONNECT)
                self._reset_session()
                self._connect = events.connect(command)
                return self._event(Stage.CONNECT, command, "connect", self._connect)
            case cmd.Helo():
                self.macros.entered(MacroStage.SMFIM_HELO)
                self._helo = events.helo(command)
                return self._event(Stage.HELO, command, "helo", self._helo)
            case cmd.Mail():
                self.macros.entered(MacroStage.SMFIM_ENVFROM)
                self._reset_message()
                self._message.mail = events.mail_from(command)
                return self._event(Stage.MAIL, command, "mail_from", self._message.mail)
            case cmd.Rcpt():
                self.macros.entered(MacroStage.SMFIM_ENVRCPT)
                rejected = self._negotiated().negotiated.rejected_recipients and (
                    self.macros.value(MacroStage.SMFIM_ENVRCPT, "rcpt_mailer") == "error"
                )
                rcpt = events.rcpt_to(command, rejected=rejected)
                self._message.holds_last_recipient = False
                if self.plan.eom_envelope:  # held only for EndOfMessage.envelope
                    self._message.add_recipient(rcpt, len(command.payload()), self.limits)
                return self._event(Stage.RCPT, command, "rcpt_to", rcpt)
            case cmd.Data():
                return self._event(Stage.DATA, command, "data", pb.Data())
            case cmd.Header():
                header = events.header(command)
                if self.plan.eom_headers or self.plan.header_batch:
                    size = len(command.name) + len(command.value)
                    self._message.add_header(header, size, self.limits)
                return self._event(Stage.HEADER, command, "header", header)
            case cmd.EndOfHeaders():
                eoh = pb.EndOfHeaders()
                if self.plan.header_batch:
                    eoh.headers.extend(self._message.headers)
                    eoh.headers_truncated = self._message.headers_truncated
                return self._event(Stage.EOH, command, "end_of_headers", eoh)
            case cmd.Body():
                return self._body_chunk(command, command.chunk)
            case cmd.EndOfMessage():
                out: list[Output] = []
                if command.chunk:
                    # Old MTAs may put the last body bytes here: libmilter hands
                    # them to the body callback first. They are observed, not answered.
                    out += self._body_chunk(command, command.chunk, answer=False)
                return out + self._event(
                    Stage.EOM, command, "end_of_message", self._end_of_message()
                )
            case cmd.Unknown():
                return self._event(Stage.UNKNOWN, command, "unknown", events.unknown(command))
            case cmd.Abort():
                return self._abort_message()
            case cmd.Quit():
                self.finished = True
                return self._end_stream()
            case cmd.QuitNewConnection():
                self.macros.clear()
                self._reset_session()
                return self._end_stream()
        msg = f"no handler for {command!r}"  # every MtaCommand is matched above
        raise AssertionError(msg)

    def _body_chunk(
        self, command: cmd.MtaCommand, chunk: bytes, *, answer: bool = True
    ) -> list[Output]:
        self._message.add_body(chunk, self.limits, buffered=self.plan.body is Body.BUFFERED)
        if not answer:
            if self._mode(Stage.BODY) is Mode.SKIP:
                return []
            return self._send(Stage.BODY, pb.BodyChunk(data=chunk), "body_chunk", {}, decide=False)
        return self._event(Stage.BODY, command, "body_chunk", pb.BodyChunk(data=chunk))

    def _end_of_message(self) -> pb.EndOfMessage:
        message = self._message
        eom = pb.EndOfMessage(body_size=message.body_size)
        if self.plan.eom_envelope:
            envelope = eom.envelope
            if self._connect is not None:
                envelope.connect.CopyFrom(self._connect)
            if self._helo is not None:
                envelope.helo.CopyFrom(self._helo)
            if message.mail is not None:
                envelope.mail_from.CopyFrom(message.mail)
            envelope.recipients.extend(message.recipients)
            envelope.recipients_truncated = message.recipients_truncated
            for name, stage in ENVELOPE_MACROS.items():
                envelope.macros[name].values.update(self.macros.of(stage))
        if self.plan.eom_headers:
            eom.headers.extend(message.headers)
            eom.headers_truncated = message.headers_truncated
        if self.plan.body is Body.BUFFERED:
            eom.body = bytes(message.body)
            eom.body_truncated = message.body_size > len(message.body)
        return eom

    def _abort_message(self) -> list[Output]:
        out: list[Output] = []
        if self._message.seen and self._mode(Stage.ABORT) is not Mode.SKIP and self.stream:
            out = self._send(Stage.ABORT, pb.Abort(), "abort", {}, decide=False)
        self._reset_message()
        return out

    # -- events to the policy ------------------------------------------------

    def _event(
        self, stage: Stage, command: cmd.MtaCommand, field: str, message: ProtoMessage
    ) -> list[Output]:
        mode = self._mode(stage)
        out: list[Output] = []
        if mode is not Mode.SKIP:
            macro_stage = c.MACRO_STAGE_OF_COMMAND.get(command.code)
            macros = self.macros.of(macro_stage) if macro_stage is not None else {}
            out += self._send(stage, message, field, macros, decide=mode is Mode.DECIDE)
            if mode is Mode.DECIDE:
                self.pending = Pending(self._sequence, stage, command.code)
                return out
        if stage not in self._negotiated().no_reply:
            out.append(SendToMta(_CONTINUE))
        if stage is Stage.EOM:
            self._reset_message()
        return out

    def _send(
        self,
        stage: Stage,
        message: ProtoMessage,
        field: str,
        macros: dict[str, str],
        *,
        decide: bool,
    ) -> list[Output]:
        if self.policy_failure is not None:
            return []  # the policy failed on this message: it sees no more of it
        out: list[Output] = []
        if not self.stream:
            self._streams += 1
            self.stream = self._streams
            self._sequence = 1
            start = pb.StreamStart(
                fingerprint=self.plan.fingerprint,
                capabilities=self.plan.capabilities,
                negotiated=self._negotiated().negotiated,
                # A new stream (after a failure, or QUIT_NC) is a new session_id:
                # its sequence numbers start again at 1.
                session_id=f"{self.connection_id}.{self._streams}",
            )
            request = pb.ProcessRequest(sequence=1, start=start)
            out.append(SendToPolicy(request, self.stream, stage))
            if self._max_replays:
                self._journal, self._replays = Journal(request), 0
        self._sequence += 1
        in_message = ROW[stage].in_message
        if in_message:
            self._message.seen = True
        request = pb.ProcessRequest(sequence=self._sequence, reply_expected=decide, macros=macros)
        getattr(request, field).CopyFrom(message)
        out.append(SendToPolicy(request, self.stream, stage))
        if self._journal is not None:
            self._journal.add(request, stage, in_message=in_message)
        return out

    def _end_stream(self) -> list[Output]:
        if not self.stream:
            return []
        stream, self.stream = self.stream, 0
        return [EndPolicyStream(stream)]

    # -- answers ------------------------------------------------------------

    def _resolve(self, replies: list[r.MilterReply], action: int) -> list[Output]:
        p = self.pending
        assert p is not None  # callers checked
        self.pending = None
        out: list[Output] = [SendToMta(encode_all(replies))]
        if p.stage is Stage.EOM:
            self._reset_message()
        refused = action in (pb.ACTION_REJECT, pb.ACTION_TEMPFAIL)
        if p.stage is Stage.RCPT and refused:
            self._message.refuse_last_recipient()
        # engine.c: after ACCEPT, and after REJECT/TEMPFAIL/DISCARD of any command but
        # RCPT and UNKNOWN, the state falls back to HELO.
        ends = action == pb.ACTION_ACCEPT or (
            action in (pb.ACTION_REJECT, pb.ACTION_TEMPFAIL, pb.ACTION_DISCARD)
            and p.command not in KEEPS_STATE_ON_REJECT
        )
        if ends:
            self.state = State.HELO
        if action == pb.ACTION_ACCEPT and p.stage in (Stage.CONNECT, Stage.HELO):
            self._session_accepted = True
        elif (ends or action == pb.ACTION_DISCARD) and p.stage in MESSAGE_STAGES - {Stage.EOM}:
            # The policy has decided this message; it sees no more of it.
            self._message.done = True
        elif action == pb.ACTION_SKIP:
            self._message.skip_body = True
        while self._queue and self.pending is None and not self.finished:
            out += self._handle(self._queue.popleft())
        return out
