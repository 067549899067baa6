"""One MTA connection to the milter, playing Postfix 3.7's side (milter_protocol=6).

OPTNEG, CONNECT and HELO once, then one message after the other: MAIL, RCPT
for each recipient, DATA, the headers, end of headers, body chunks and end of
message, each preceded by its macros, each left out or not awaited as
negotiated; ABORT after every message, ABORT and QUIT at the end (Postfix
sends both). Writes are batched up to the next event that is awaited. A message
picked by abandon.py ends the connection at its point instead (no ABORT, no
QUIT); the next message opens a new one.
"""

from __future__ import annotations

import asyncio
import itertools
from time import perf_counter

from milter_bridge.load.abandon import Abandon
from milter_bridge.load.plan import ABORT_PACKET, OFFER_PACKET, QUIT_PACKET, Plan
from milter_bridge.load.shape import Shape
from milter_bridge.load.stats import ErrorKind, Stats
from milter_bridge.load.verdicts import Judgement, Kind, Stage, Verdict, judge
from milter_bridge.load.wire import Closed, Target, Wire
from milter_bridge.protocol import ProtocolError, encode
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r

EOM_PACKET = encode(cmd.EndOfMessage())
CONTINUED = Judgement(Verdict(Kind.CONTINUE))


class Over(Exception):
    """The connection cannot go on (an error was recorded, or the MTA abandoned it);
    the message ends as ``label``, without a latency."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


class Context:
    """What every connection of one run shares."""

    def __init__(
        self, target: Target, shape: Shape, stats: Stats, timeout: float, abandon: Abandon
    ) -> None:
        self.target = target
        self.shape = shape
        self.stats = stats
        self.timeout = timeout
        self.abandon = abandon
        self.plans: dict[r.OptionNegotiationReply, Plan] = {}
        self.queue_ids = itertools.count(0x1000000)
        self.closing: set[asyncio.Future[None]] = set()  # after QUIT, or abandoned
        self.numbers = itertools.count()


class Connection:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.number = next(ctx.numbers)
        self.message: int | None = None
        self.messages = 0
        self.usable = False
        self._wire: Wire | None = None
        self._plan: Plan | None = None
        self._out: list[bytes] = []  # written with the next awaited event

    async def start(self, k: int) -> bool:
        """Connect, OPTNEG, CONNECT, HELO; when the connection ends there, message ``k`` ends."""
        ctx = self.ctx
        self.message = k
        try:
            async with asyncio.timeout(ctx.timeout):
                self._wire = await ctx.target.open(lambda: Wire(self.between_answers))
        except (OSError, TimeoutError) as exc:
            ctx.stats.connect_failed(f"{ctx.target}: {exc or type(exc).__name__}")
            return False
        ctx.stats.connections += 1
        self.usable = True
        try:
            label = await self._open()
        except Over as over:
            label = over.label
        if label:
            ctx.stats.outcome(label)
            self._close_stream()
        self.message = None
        return not label

    async def _open(self) -> str:
        """How the session ended at OPTNEG, CONNECT or HELO; empty when messages can follow."""
        self._out.append(OFFER_PACKET)
        replies = await self._exchange(Stage.OPTNEG)
        reply = replies[-1]
        if len(replies) > 1 or not isinstance(reply, r.OptionNegotiationReply):
            self._fail(ErrorKind.NEGOTIATION, Stage.OPTNEG, f"answer to OPTNEG: {replies!r}")
            raise Over("optneg protocol error")
        plan = self.ctx.plans.get(reply)
        if plan is None:
            plan = self.ctx.plans[reply] = Plan(reply, self.ctx.shape)
        self._plan = plan
        self.ctx.stats.negotiations[reply] += 1
        if plan.fatal:
            self._fail(ErrorKind.NEGOTIATION, Stage.OPTNEG, plan.fatal)
            raise Over("optneg protocol error")
        for problem in plan.problems:
            self.error(ErrorKind.NEGOTIATION, Stage.OPTNEG, problem)
        connect, helo = plan.connect_packets(40000 + self.number % 20000)
        for stage, packets, event in (
            (Stage.CONNECT, connect, plan.connect),
            (Stage.HELO, helo, plan.helo),
        ):
            self._out.append(packets)
            if event.waits:
                verdict = (await self.ask(stage)).verdict
                if verdict.kind is not Kind.CONTINUE:
                    # ACCEPT, REJECT, TEMPFAIL: Postfix closes the milter socket, no QUIT.
                    return f"{stage.value} {verdict.label}"
        return ""

    async def send_message(self, k: int) -> None:
        """Message ``k`` from MAIL to end of message, its outcome recorded; then ABORT."""
        self.message = k
        self.messages += 1
        started = perf_counter()
        try:
            label = await self._message(k)
        except Over as over:
            self.ctx.stats.outcome(over.label)
        else:
            self.ctx.stats.outcome(label, perf_counter() - started)
            self._out.append(ABORT_PACKET)
        self.message = None

    async def _message(self, k: int) -> str:  # noqa: PLR0911, PLR0912, PLR0915 - a branch per event
        plan, out = self.plan, self._out
        stop = self.ctx.abandon.point(k, plan.abandon_points)  # None: not abandoned
        out.append(plan.mail_packets)
        if stop is Stage.MAIL:
            raise self._abandon(stop)
        if plan.mail.waits and (label := await self._refused(Stage.MAIL)):
            return label
        queue_id = b"%X" % next(self.ctx.queue_ids)
        accepted, refused = 0, ""
        for macros, rcpt in plan.recipients:
            out.append(macros.packet(queue_id if accepted else b""))
            out.append(rcpt)
            if stop is Stage.RCPT:
                raise self._abandon(stop)
            if not plan.rcpt.waits:
                accepted += 1
                continue
            verdict = (await self.ask(Stage.RCPT)).verdict
            if verdict.kind is Kind.CONTINUE:
                accepted += 1
            elif verdict.kind in (Kind.REJECT, Kind.TEMPFAIL):
                refused = verdict.label  # this recipient only
                self.ctx.stats.refused_recipients[refused] += 1
            else:
                return f"rcpt {verdict.label}"
        if not accepted:
            return f"rcpt {refused}"
        if plan.data_macros is not None:
            out.append(plan.data_macros.packet(queue_id))
            out.append(plan.data_packet)
            if stop is Stage.DATA:
                raise self._abandon(stop)
            if plan.data.waits and (label := await self._refused(Stage.DATA)):
                return label
        if plan.header.sent:
            header_macros = plan.header_macros.packet(queue_id)
            headers = plan.header_packets(queue_id, marked=self.ctx.shape.marked(k))
            unanswered = None
            if stop is Stage.HEADER:  # the first half, the last of them written but not answered
                headers = headers[: (len(headers) + 1) // 2]
                unanswered = headers[-1]
            if not plan.header.waits:
                out.append(header_macros)
                out.append(header_macros.join(headers))
            for header in headers if plan.header.waits else ():
                out.append(header_macros)
                out.append(header)
                if header is unanswered:  # every header packet is a bytes object of its own
                    break
                if label := await self._refused(Stage.HEADER):
                    return label
            if stop is Stage.HEADER:
                raise self._abandon(stop)
        if plan.eoh.sent:
            out.append(plan.eoh_macros.packet(queue_id))
            out.append(plan.eoh_packets)
            if stop is Stage.EOH:
                raise self._abandon(stop)
            if plan.eoh.waits and (label := await self._refused(Stage.EOH)):
                return label
        if plan.body.sent:
            body_macros = plan.body_macros.packet(queue_id)
            chunks = plan.body_packets
            if stop is Stage.BODY:  # the chunks before the middle one, then half of its packet
                middle = len(chunks) // 2
                cut = chunks[middle][: len(chunks[middle]) // 2]
                chunks = chunks[:middle]
            for chunk in chunks:
                out.append(body_macros)
                out.append(chunk)
                if not plan.body.waits:
                    continue
                verdict = (await self.ask(Stage.BODY)).verdict
                if verdict.kind is Kind.SKIP:
                    break
                if verdict.kind is not Kind.CONTINUE:
                    return f"body {verdict.label}"
            else:
                if stop is Stage.BODY:  # not after SKIP: no more body goes out then
                    out.append(body_macros)
                    out.append(cut)
            if stop is Stage.BODY:
                raise self._abandon(stop)
        out.append(plan.eom_macros.packet(queue_id))
        out.append(EOM_PACKET)
        if stop is Stage.EOM:
            raise self._abandon(stop)
        return f"eom {(await self.ask(Stage.EOM)).verdict.label}"

    def _abandon(self, stage: Stage) -> Over:
        """The MTA goes away at ``stage``: what is queued is written, the connection ends."""
        self.usable = False
        abandon = self.ctx.abandon
        data = b"".join(self._out)
        self._out.clear()
        closed = self.wire.abandon(data, reset=abandon.how == "rst", timeout=self.ctx.timeout)
        self.ctx.closing.add(closed)
        closed.add_done_callback(self.ctx.closing.discard)
        return Over(abandon.label(stage))

    def close(self) -> None:
        """ABORT and QUIT as Postfix ends a session; the milter's close is awaited by the run."""
        if self.usable:
            self._out += (ABORT_PACKET, QUIT_PACKET)
            closed = self.wire.finish(b"".join(self._out), self.ctx.timeout)
            self.ctx.closing.add(closed)
            closed.add_done_callback(self.ctx.closing.discard)
            self.usable = False
        else:
            self._close_stream()

    def _close_stream(self) -> None:
        self.usable = False
        if self._wire is not None and self._wire.transport is not None:
            self._wire.transport.close()

    @property
    def wire(self) -> Wire:
        assert self._wire is not None
        return self._wire

    @property
    def plan(self) -> Plan:
        assert self._plan is not None
        return self._plan

    def between_answers(self, kind: ErrorKind, text: str) -> None:
        self.error(kind, None, text)

    def error(self, kind: ErrorKind, stage: Stage | None, text: str) -> None:
        where = stage.value if stage is not None else "-"
        self.ctx.stats.error(kind, self.number, self.message, where, text)

    def _fail(self, kind: ErrorKind, stage: Stage, text: str) -> None:
        self.error(kind, stage, text)
        self.usable = False
        if self._wire is not None and self._wire.transport is not None:
            self._wire.transport.abort()

    async def _exchange(self, stage: Stage) -> list[r.MilterReply]:
        """Write what is queued and return the answer; raises Over when there is none."""
        data = b"".join(self._out)
        self._out.clear()
        asked = perf_counter()
        try:
            replies = await self.wire.ask(data, self.ctx.timeout)
        except ProtocolError as exc:
            self._fail(ErrorKind.MALFORMED, stage, str(exc))
            raise Over(f"{stage.value} protocol error") from None
        except TimeoutError as exc:
            self._fail(ErrorKind.TIMEOUT, stage, f"after {self.ctx.timeout:g}s: {exc}")
            raise Over(f"{stage.value} timeout") from None
        except Closed as exc:
            self._fail(ErrorKind.CLOSED, stage, str(exc))
            raise Over(f"{stage.value} closed") from None
        # The worst single answer, from writing up to this event to its final reply.
        took = perf_counter() - asked
        stats = self.ctx.stats
        if took > stats.worst_answer:
            stats.worst_answer, stats.worst_answer_stage = took, stage.value
        return replies

    async def _refused(self, stage: Stage) -> str:
        """The message's outcome when the milter ended it here; empty when it goes on."""
        verdict = (await self.ask(stage)).verdict
        return "" if verdict.kind is Kind.CONTINUE else f"{stage.value} {verdict.label}"

    async def ask(self, stage: Stage) -> Judgement:
        """Send up to an awaited event and judge its answer; raises Over when it cannot go on."""
        replies = await self._exchange(stage)
        if len(replies) == 1 and type(replies[0]) is r.Continue:
            return CONTINUED
        plan = self.plan
        verdict = judge(stage, replies, plan.actions, skip=plan.skip)
        for problem in verdict.problems:
            self.error(ErrorKind.INVALID, stage, problem)
        if verdict.fatal:
            self._fail(ErrorKind.INVALID, stage, verdict.fatal)
            raise Over(f"{stage.value} protocol error")
        if verdict.modifications:
            self.ctx.stats.modifications.update(verdict.modifications)
        self.ctx.stats.progress += verdict.progress
        return verdict
