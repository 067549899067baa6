"""A model MTA against random capabilities: the connection never desynchronises.

The model sends what an MTA sends after the negotiation (nothing the milter
opted out of, UNKNOWN anywhere SMTP allows it, several messages, aborts) and
expects exactly one final reply to every command that was not negotiated
no-reply, none to the others, and every end of message answered.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.session import Mode, Plan, Stage
from milter_bridge.session.negotiation import negotiate
from milter_bridge.session.stages import NO_FLAG, NR_FLAG
from milter_bridge.v1 import policy_pb2 as pb
from tests.session.harness import Mta

MODES = st.sampled_from([pb.EVENT_MODE_SKIP, pb.EVENT_MODE_OBSERVE, pb.EVENT_MODE_DECIDE])
FINAL = (r.Continue, r.Accept, r.Reject, r.TempFail, r.Discard, r.Skip, r.ReplyCode)


@st.composite
def capabilities(draw: st.DrawFn) -> pb.Capabilities:
    modes = {s.value: draw(MODES) for s in Stage if s is not Stage.ABORT}
    modes["abort"] = draw(st.sampled_from([pb.EVENT_MODE_SKIP, pb.EVENT_MODE_OBSERVE]))
    eom = pb.EndOfMessageContent(envelope=draw(st.booleans()), headers=draw(st.booleans()))
    body = (
        pb.BODY_DELIVERY_STREAM
        if modes["body"] != pb.EVENT_MODE_SKIP
        else draw(st.sampled_from([pb.BODY_DELIVERY_NONE, pb.BODY_DELIVERY_BUFFERED]))
    )
    if eom.envelope or eom.headers or body == pb.BODY_DELIVERY_BUFFERED:
        modes["end_of_message"] = draw(
            st.sampled_from([pb.EVENT_MODE_OBSERVE, pb.EVENT_MODE_DECIDE])
        )
    return pb.Capabilities(
        events=pb.EventModes(**modes),
        header_delivery=draw(st.sampled_from([pb.HEADER_DELIVERY_EACH, pb.HEADER_DELIVERY_BATCH])),
        body_delivery=body,
        end_of_message_content=eom,
    )


OFFERS = st.sampled_from(
    [
        cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF)),  # Postfix, Sendmail
        cmd.OptionNegotiation(2, ActionFlag(0x1FF), ProtocolFlag(0x7F)),  # Postfix protocol 2
        cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0)),  # an old MTA: v1 defaults
    ]
)

# One SMTP session as an MTA may send it; U may come anywhere SMTP allows a command.
Step = tuple[Stage, cmd.MtaCommand]


@st.composite
def session_script(draw: st.DrawFn) -> list[Step]:
    def maybe_unknown() -> list[Step]:
        return [(Stage.UNKNOWN, cmd.Unknown(b"XFOO"))] if draw(st.booleans()) else []

    steps: list[Step] = [(Stage.CONNECT, cmd.Connect(b"h", b"4", 1, b"127.0.0.1"))]
    steps += [(Stage.HELO, cmd.Helo(b"h")), *maybe_unknown()]
    for _ in range(draw(st.integers(1, 3))):
        steps += [(Stage.MAIL, cmd.Mail(b"<a@x>")), *maybe_unknown()]
        steps += [(Stage.RCPT, cmd.Rcpt(b"<b@x>"))] * draw(st.integers(1, 3)) + maybe_unknown()
        if draw(st.booleans()):
            steps.append((Stage.ABORT, cmd.Abort()))  # RSET before DATA
            continue
        steps += [(Stage.DATA, cmd.Data())]
        steps += [(Stage.HEADER, cmd.Header(b"X", b"y"))] * draw(st.integers(0, 3))
        steps += [(Stage.EOH, cmd.EndOfHeaders())]
        steps += [(Stage.BODY, cmd.Body(b"z\r\n"))] * draw(st.integers(0, 3))
        steps += [(Stage.EOM, cmd.EndOfMessage())]
        steps += [(Stage.ABORT, cmd.Abort())] * draw(st.integers(0, 2))  # Postfix's habit
    return steps


@settings(max_examples=1000, deadline=None)
@given(capabilities(), OFFERS, session_script())
def test_the_connection_never_desynchronises(
    caps: pb.Capabilities, offer: cmd.OptionNegotiation, script: list[Step]
) -> None:
    mta = Mta(caps, offer)
    negotiation = negotiate(Plan.from_capabilities(caps), offer)
    agreed = negotiation.reply.protocol
    eoms = 0
    for stage, command in script:
        if stage in NO_FLAG and agreed & NO_FLAG[stage]:
            continue  # the MTA was told not to send it
        if (stage is Stage.DATA and offer.version < 4) or (
            stage is Stage.UNKNOWN and offer.version < 3
        ):
            continue  # the MTA's protocol version does not have it
        replies = mta.send(command)
        while mta.session.pending is not None:  # the policy continues wherever it decides
            replies += mta.verdict(pb.ACTION_CONTINUE)
        finals = [x for x in replies if isinstance(x, FINAL)]
        expects = stage is not Stage.ABORT and not (stage in NR_FLAG and agreed & NR_FLAG[stage])
        assert len(finals) == (1 if expects else 0), (stage, replies)
        assert replies == finals, replies  # nothing but the one answer
        eoms += stage is Stage.EOM
    assert sum(1 for x in mta.to_policy if x.HasField("end_of_message")) <= eoms
    mta.send(cmd.Quit())
    assert mta.session.finished


@settings(max_examples=300, deadline=None)
@given(capabilities(), st.integers(2, 6), st.integers(0, 0x1FF), st.integers(0, 0x1FFFFF))
def test_negotiation_invariants(
    caps: pb.Capabilities, version: int, actions: int, protocol: int
) -> None:
    plan = Plan.from_capabilities(caps)
    neg = negotiate(
        plan, cmd.OptionNegotiation(version, ActionFlag(actions), ProtocolFlag(protocol))
    )
    agreed = neg.reply.protocol
    for stage, no_flag in NO_FLAG.items():
        if plan.needs_from_mta(stage):
            assert not agreed & no_flag, stage  # never switch off what is needed
        if neg.modes[stage] is Mode.DECIDE:
            assert not agreed & NR_FLAG[stage], stage  # never "no reply" for a decision
        assert (stage in neg.no_reply) == bool(agreed & NR_FLAG[stage])
