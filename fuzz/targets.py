"""Fuzz targets: pure functions of one input, importable without atheris.

Each target returns normally for any input the bridge handles as documented
(including the documented bad-input errors, which it swallows) and raises
anything else: an unexpected exception, or an ``AssertionError`` from a
broken invariant (a reply to the MTA that does not decode, memory held
beyond the configured limits, an invalid answer that changed the session).
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError

from milter_bridge.protocol import ReplyDecoder, encode, encode_all
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.errors import InvalidAnswer, ProtocolError
from milter_bridge.session import Output, Plan, ProgressToMta, SendToMta, Session, Stage
from milter_bridge.session.machine import MAX_QUEUED_COMMANDS
from milter_bridge.session.plan import InvalidCapabilitiesError
from milter_bridge.v1 import policy_pb2 as pb
from tests.session import harness as h

# Small limits, so that the fuzzer reaches them.
MAX_PACKET = 4096
MAX_READS = 256  # reads per input: a one-byte read size on a long input is only slow
LIMITS = {
    "max_packet_size": MAX_PACKET,
    "max_body_buffer": 1024,
    "max_header_buffer": 512,
    "max_headers": 8,
    "max_recipients": 4,
    "max_recipient_buffer": 512,
}
OFFER = encode(h.OFFER_V6)


def plans() -> list[pb.Capabilities]:
    d, o, s = h.DECIDE, h.OBSERVE, h.SKIP
    return [
        h.decide_everything(),
        h.eom_only(),
        h.capabilities(o),
        h.capabilities(o, end_of_message=d, actions=h.ALL_ACTIONS),
        h.capabilities(s, rcpt_to=d, header=d, unknown=d),
        h.capabilities(
            d,
            body=s,
            actions=h.ALL_ACTIONS,
            body_delivery=pb.BODY_DELIVERY_BUFFERED,
            end_of_message_content=pb.EndOfMessageContent(envelope=True, headers=True),
        ),
        h.capabilities(s),
        h.capabilities(d, header_delivery=pb.HEADER_DELIVERY_BATCH),
    ]


PLANS = [Plan.from_capabilities(c, "fp-fuzz") for c in plans()]


class _Mta:
    """The MTA's side of the outputs: every write must decode into whole replies."""

    def __init__(self) -> None:
        self.decoder = ReplyDecoder()

    def take(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, SendToMta | ProgressToMta):
                self.decoder.feed(o.data)  # raises ProtocolError: the bridge sent garbage
                assert self.decoder.frames.buffered == 0, "a write that ends mid-packet"


def _decode_check(mta: _Mta, outputs: list[Output]) -> None:
    try:
        mta.take(outputs)
    except ProtocolError as e:
        msg = f"a reply the bridge sent does not decode: {e}"
        raise AssertionError(msg) from e


def check_memory(session: Session, *, closed: bool = False) -> None:
    """What the session holds stays within its configured limits.

    After a ProtocolError (``closed``) the decoder still holds the read that
    broke the protocol; the connection drops it with the session.
    """
    if not closed:
        held = session.decoder.frames.buffered
        assert held <= MAX_PACKET + 5, held
    assert len(session._queue) <= MAX_QUEUED_COMMANDS, len(session._queue)
    message, limits = session.message, session.limits
    assert len(message.body) <= limits.body_limit, len(message.body)
    assert len(message.headers) <= limits.max_headers
    assert message.header_bytes <= limits.max_header_buffer
    assert len(message.recipients) <= limits.max_recipients
    assert message.recipient_bytes <= limits.max_recipient_buffer


def new_session(plan_byte: int) -> Session:
    return Session(PLANS[plan_byte % len(PLANS)], connection_id="fuzz", **LIMITS)


def _continue_pending(session: Session, mta: _Mta) -> None:
    """Answer whatever awaits the policy with a plain continue (valid at every stage)."""
    for _ in range(64):
        p = session.pending
        if p is None or session.finished:
            return
        response = pb.ProcessResponse(
            sequence=p.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
        )
        _decode_check(mta, session.answer(response))  # ProtocolError: a queued command
        check_memory(session)


def session_feed(data: bytes) -> None:
    """MTA bytes into a session; byte 0 picks the plan and the offer, byte 1 the read size."""
    if len(data) < 2:
        return
    session = new_session(data[0] & 0x3F)
    mta = _Mta()
    payload = data[2:]
    if data[0] & 0x40:  # most inputs negotiate first, so that the fuzzer reaches later stages
        payload = OFFER + payload
    step = max(data[1] or len(payload), -(-len(payload) // MAX_READS), 1)
    answer = not data[0] & 0x80
    try:
        for i in range(0, len(payload), step):
            _decode_check(mta, session.feed(payload[i : i + step]))
            check_memory(session)
            if answer:
                _continue_pending(session, mta)
        _decode_check(mta, session.connection_lost())
    except ProtocolError:
        check_memory(session, closed=True)


# -- the policy-answer path ----------------------------------------------------

_PATH: list[tuple[Stage, list[MtaCommand]]] = [
    (Stage.CONNECT, h.connect()),
    (Stage.HELO, h.helo()),
    (Stage.MAIL, h.mail()),
    (Stage.RCPT, h.rcpt()),
    (Stage.DATA, h.content()[:2]),
    (Stage.HEADER, [cmd.Header(b"Subject", b"hi")]),
    (Stage.EOH, [cmd.EndOfHeaders()]),
    (Stage.BODY, [cmd.Body(b"x\r\n")]),
    (Stage.EOM, h.eom()),
]
STAGES = [*(s for s, _ in _PATH), Stage.UNKNOWN]


def at(stage: Stage) -> tuple[Session, _Mta]:
    """A decide-everything session whose ``stage`` event awaits the policy."""
    session = Session(PLANS[0], connection_id="fuzz", **LIMITS)
    mta = _Mta()
    _decode_check(mta, session.feed(OFFER))
    steps = _PATH
    if stage is Stage.UNKNOWN:
        steps = [_PATH[0], (Stage.UNKNOWN, [cmd.Unknown(b"XFOO")])]
    for step, commands in steps:
        _decode_check(mta, session.feed(encode_all(commands)))
        if step is stage:
            break
        _continue_pending(session, mta)
    assert session.pending is not None
    assert session.pending.stage is stage
    return session, mta


def session_answer(data: bytes) -> None:
    """A ProcessResponse parsed from bytes 2.. answers the event of stage ``data[0]``.

    Bit 0 of byte 1 sets the answer's sequence to the pending one (the fuzzer
    would seldom guess it); bit 1 answers it a second time.
    """
    if len(data) < 2:
        return
    try:
        response = pb.ProcessResponse.FromString(data[2:])
    except DecodeError:
        return
    session, mta = at(STAGES[data[0] % len(STAGES)])
    pending = session.pending
    assert pending is not None
    if data[1] & 1:
        response.sequence = pending.sequence
    for _ in range(2 if data[1] & 2 else 1):
        pending = session.pending
        try:
            outputs = session.answer(response)
        except InvalidAnswer:
            assert session.pending is pending, "an invalid answer changed the session"
            continue
        _decode_check(mta, outputs)
        check_memory(session)
    _continue_pending(session, mta)


# -- the policy's capabilities (its Describe answer) ---------------------------

# One message of every kind, command by command as an MTA sends them (the
# bridge's own negotiation first); each awaited answer is a plain continue.
_WHOLE_SESSION = [
    encode(command)
    for command in (
        h.OFFER_V6,
        *h.connect(),
        *h.helo(),
        *h.mail(),
        *h.rcpt(),
        *h.content(),
        *h.eom(),
        cmd.Abort(),
        cmd.Unknown(b"XFOO"),
        cmd.Quit(),
    )
]


def _requests_serialize(outputs: list[Output]) -> None:
    for output in outputs:
        request = getattr(output, "request", None)
        if request is not None:
            request.SerializeToString()


def capabilities(data: bytes) -> None:
    """A Capabilities message parsed from the input: refused as documented
    (``InvalidCapabilitiesError``) or, once accepted, a plan that carries a whole
    well-formed session: the negotiation the bridge offers the MTA, every request it
    would send (each must serialize), replies that decode, memory within the limits.
    The MTA's side is well-formed, so here a ProtocolError is a crash too."""
    try:
        caps = pb.Capabilities.FromString(data)
    except DecodeError:
        return
    try:
        plan = Plan.from_capabilities(caps, "fp-fuzz")
    except InvalidCapabilitiesError:
        return
    session = Session(plan, connection_id="fuzz", **LIMITS)
    mta = _Mta()
    for packet in _WHOLE_SESSION:
        if session.finished:
            break
        outputs = session.feed(packet)
        _requests_serialize(outputs)
        _decode_check(mta, outputs)
        check_memory(session)
        for _ in range(64):
            pending = session.pending
            if pending is None or session.finished:
                break
            outputs = session.answer(
                pb.ProcessResponse(
                    sequence=pending.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
                )
            )
            _requests_serialize(outputs)
            _decode_check(mta, outputs)
            check_memory(session)
    _decode_check(mta, session.connection_lost())


TARGETS: dict[str, Callable[[bytes], None]] = {
    "session_feed": session_feed,
    "session_answer": session_answer,
    "capabilities": capabilities,
}
