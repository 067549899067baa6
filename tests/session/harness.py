"""Drive a Session as an MTA would: encode commands with the codec, decode what comes back."""

from __future__ import annotations

from milter_bridge.protocol import ReplyDecoder, encode_all
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.protocol.replies import MilterReply
from milter_bridge.session import (
    EndPolicyStream,
    FailureAction,
    Output,
    Plan,
    ProgressToMta,
    SendToMta,
    SendToPolicy,
    Session,
)
from milter_bridge.v1 import policy_pb2 as pb

SKIP, OBSERVE, DECIDE = pb.EVENT_MODE_SKIP, pb.EVENT_MODE_OBSERVE, pb.EVENT_MODE_DECIDE
EVENTS = [f.name for f in pb.EventModes.DESCRIPTOR.fields]
ALL_ACTIONS = pb.Actions(**{f.name: True for f in pb.Actions.DESCRIPTOR.fields})

# What Postfix 3.7 (milter_protocol=6) and Sendmail 8.17 offer.
OFFER_V6 = cmd.OptionNegotiation(6, ActionFlag(0x1FF), ProtocolFlag(0x1FFFFF))


def capabilities(default: int = SKIP, **overrides: object) -> pb.Capabilities:
    """Capabilities with every event at ``default``; keyword arguments set events or fields."""
    modes = dict.fromkeys(EVENTS, default)
    if modes["abort"] == DECIDE:
        modes["abort"] = OBSERVE
    fields: dict[str, object] = {}
    for key, value in overrides.items():
        if key in modes:
            modes[key] = int(value)  # type: ignore[call-overload]
        else:
            fields[key] = value
    fields.setdefault("header_delivery", pb.HEADER_DELIVERY_EACH)
    if "body_delivery" not in fields:
        stream = modes["body"] != SKIP
        fields["body_delivery"] = pb.BODY_DELIVERY_STREAM if stream else pb.BODY_DELIVERY_NONE
    return pb.Capabilities(events=pb.EventModes(**modes), **fields)  # type: ignore[arg-type]


def decide_everything() -> pb.Capabilities:
    return capabilities(DECIDE, actions=ALL_ACTIONS)


def eom_only() -> pb.Capabilities:
    """The common shape: one round trip per message, at end of message, with everything in it."""
    return capabilities(
        end_of_message=DECIDE,
        body_delivery=pb.BODY_DELIVERY_BUFFERED,
        end_of_message_content=pb.EndOfMessageContent(envelope=True, headers=True),
        actions=ALL_ACTIONS,
    )


class Mta:
    """An MTA talking to one Session; records what the policy would receive."""

    def __init__(
        self,
        caps: pb.Capabilities,
        offer: cmd.OptionNegotiation | None = OFFER_V6,
        replays: int = 0,
    ):
        plan = Plan.from_capabilities(caps, "fp-1")
        self.session = Session(plan, connection_id="conn", replays=replays)
        self.to_policy: list[pb.ProcessRequest] = []
        self.stream_ends = 0
        self.optneg: list[MilterReply] = []
        if offer is not None:
            self.optneg = self.send(offer)

    def _collect(self, outputs: list[Output]) -> list[MilterReply]:
        decoder = ReplyDecoder()
        replies: list[MilterReply] = []
        for o in outputs:
            if isinstance(o, SendToMta | ProgressToMta):
                replies += decoder.feed(o.data)
            elif isinstance(o, SendToPolicy):
                # As the connection: nothing for a stream that failed meanwhile.
                if o.stream != self.session.failed_stream:
                    self.to_policy.append(o.request)
            elif isinstance(o, EndPolicyStream):
                self.stream_ends += 1
        assert decoder.frames.buffered == 0
        return replies

    def send(self, *commands: MtaCommand) -> list[MilterReply]:
        """Feed commands as one read; the replies the MTA gets back."""
        return self._collect(self.session.feed(encode_all(list(commands))))

    def writes(self, command: MtaCommand) -> list[bytes]:
        """Feed one command; the writes to the MTA it caused, undecoded (none for NR events)."""
        outputs = self.session.feed(encode_all([command]))
        self._collect(outputs)
        return [o.data for o in outputs if isinstance(o, SendToMta | ProgressToMta)]

    def replay(self) -> list[pb.ProcessRequest]:
        """The open stream broke (its replica went away): what the session sends again."""
        before = len(self.to_policy)
        self._collect(self.session.replay(self.session.stream))
        return self.to_policy[before:]

    def answer(self, response: pb.ProcessResponse) -> list[MilterReply]:
        return self._collect(self.session.answer(response))

    def verdict(self, action: int, **reply: object) -> list[MilterReply]:
        verdict = pb.Verdict(action=action)  # type: ignore[arg-type]
        if reply:
            verdict.reply.CopyFrom(pb.SmtpReply(**reply))  # type: ignore[arg-type]
        return self.answer(pb.ProcessResponse(sequence=self.pending_sequence(), verdict=verdict))

    def fail(self, action: FailureAction, cause: str = "timeout") -> list[MilterReply]:
        """What the connection does when the policy fails: tell the session, then answer."""
        self.session.policy_failed(self.session.stream, "the policy failed", cause)
        return self._collect(self.session.fail(action))

    def pending_sequence(self) -> int:
        assert self.session.pending is not None, "no event awaits an answer"
        return self.session.pending.sequence

    def last(self) -> pb.ProcessRequest:
        return self.to_policy[-1]

    def events(self) -> list[str]:
        """The kinds of the requests the policy received, in order."""
        return [str(r.WhichOneof("event")) for r in self.to_policy]


# A complete SMTP transaction's commands, with macros as Postfix sends them.
def connect() -> list[MtaCommand]:
    return [
        cmd.DefineMacro(b"C", ((b"j", b"mx.example.test"), (b"{daemon_name}", b"smtpd"))),
        cmd.Connect(b"client.example.test", b"4", 40000, b"127.0.0.1"),
    ]


def helo() -> list[MtaCommand]:
    return [cmd.DefineMacro(b"H", ()), cmd.Helo(b"client.example.test")]


def mail(address: bytes = b"<sender@example.test>") -> list[MtaCommand]:
    return [
        cmd.DefineMacro(b"M", ((b"{mail_addr}", address.strip(b"<>")),)),
        cmd.Mail(address, (b"SIZE=100",)),
    ]


def rcpt(address: bytes = b"<rcpt@example.test>") -> list[MtaCommand]:
    return [
        cmd.DefineMacro(b"R", ((b"{rcpt_addr}", address.strip(b"<>")), (b"i", b"QID1"))),
        cmd.Rcpt(address, (b"NOTIFY=NEVER",)),
    ]


def content(body: bytes = b"body line\r\n") -> list[MtaCommand]:
    return [
        cmd.DefineMacro(b"T", ((b"i", b"QID1"),)),
        cmd.Data(),
        cmd.Header(b"From", b"sender@example.test"),
        cmd.Header(b"Subject", b"hello"),
        cmd.DefineMacro(b"N", ()),
        cmd.EndOfHeaders(),
        cmd.Body(body),
    ]


def eom() -> list[MtaCommand]:
    return [cmd.DefineMacro(b"E", ((b"i", b"QID1"),)), cmd.EndOfMessage()]


def message() -> list[MtaCommand]:
    return [*mail(), *rcpt(), *content(), *eom()]


def every_event() -> list[tuple[list[MtaCommand], str, dict[str, str]]]:
    """One command group per event kind, with the macros the policy must see for it."""
    return [
        (connect(), "connect", {"j": "mx.example.test", "daemon_name": "smtpd"}),
        (helo(), "helo", {}),
        (mail(), "mail_from", {"mail_addr": "sender@example.test"}),
        (rcpt(), "rcpt_to", {"rcpt_addr": "rcpt@example.test", "i": "QID1"}),
        (content()[:2], "data", {"i": "QID1"}),
        ([cmd.Header(b"Subject", b"hi\n\tthere")], "header", {}),
        (
            [cmd.DefineMacro(b"N", ((b"{eoh}", b"1"),)), cmd.EndOfHeaders()],
            "end_of_headers",
            {"eoh": "1"},
        ),
        ([cmd.Body(b"line\r\n")], "body_chunk", {}),
        (eom(), "end_of_message", {"i": "QID1"}),
        ([cmd.Unknown(b"XFOO bar")], "unknown", {}),
    ]
