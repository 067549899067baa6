"""docs/policy-api.md agrees with the bridge: every JSON example passes the bridge's own checks.

Each example is fenced as ```json MessageName. Capabilities (alone or in a
DescribeResponse) must pass ``Plan.from_capabilities``, what the bridge runs on
every Describe answer. The page's ProcessRequest and ProcessResponse examples
are one conversation: a real ``Session``, planned from the page's Capabilities
example, is fed what an MTA sends for the SMTP session that the end-of-message
example's envelope describes; each ProcessRequest example must be part of the
request with its sequence (an example may leave fields out, but every field it
sets must be there with that value), and each ProcessResponse example must be
accepted by ``Session.answer`` at the event of that sequence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import constants as c
from milter_bridge.protocol.codec import encode_all
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.session import (
    Output,
    Plan,
    ProgressToMta,
    SendToMta,
    SendToPolicy,
    Session,
    Stage,
)
from milter_bridge.session.plan import macro_wire_name
from milter_bridge.session.stages import NO_FLAG
from milter_bridge.v1 import policy_pb2 as pb
from tests.session.harness import OFFER_V6

DOC = Path(__file__).resolve().parent.parent / "docs" / "policy-api.md"


@dataclass(frozen=True)
class Example:
    line: int
    name: str
    text: str

    def parse(self) -> Message:
        message: Message = getattr(pb, self.name)()
        json_format.Parse(self.text, message)  # raises on an unknown field or a wrong value
        return message


def _examples() -> list[Example]:
    text = DOC.read_text()
    return [
        Example(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in re.finditer(r"```json (\w+)\n(.*?)```", text, re.DOTALL)
    ]


EXAMPLES = _examples()
IDS = [f"line {e.line}: {e.name}" for e in EXAMPLES]


def _of(name: str) -> list[Message]:
    return [e.parse() for e in EXAMPLES if e.name == name]


def test_the_page_has_examples_of_each_kind() -> None:
    names = {e.name for e in EXAMPLES}
    assert {"Capabilities", "DescribeResponse", "ProcessRequest", "ProcessResponse"} <= names
    assert len(EXAMPLES) >= 8


def test_every_message_of_the_proto_is_in_the_document() -> None:
    text = DOC.read_text()
    missing = [name for name in pb.DESCRIPTOR.message_types_by_name if f"`{name}`" not in text]
    assert missing == []


# -- the conversation the page shows -------------------------------------------------

_FAMILY = {
    pb.ADDRESS_FAMILY_UNKNOWN: c.SMFIA_UNKNOWN,
    pb.ADDRESS_FAMILY_UNIX: c.SMFIA_UNIX,
    pb.ADDRESS_FAMILY_INET: c.SMFIA_INET,
    pb.ADDRESS_FAMILY_INET6: c.SMFIA_INET6,
}
# Envelope.macros / MacroRequest stage names -> the command a DEFINE_MACRO packet precedes.
_MACRO_COMMAND = {
    "connect": c.SMFIC_CONNECT,
    "helo": c.SMFIC_HELO,
    "mail_from": c.SMFIC_MAIL,
    "rcpt_to": c.SMFIC_RCPT,
    "data": c.SMFIC_DATA,
    "end_of_headers": c.SMFIC_EOH,
    "end_of_message": c.SMFIC_BODYEOB,
}


def _define(stage: str, values: dict[str, str]) -> list[MtaCommand]:
    """The MTA's macro packet for a stage, names as MTAs send them (``j``, ``{rcpt_addr}``)."""
    if not values:
        return []
    pairs = tuple((macro_wire_name(n).encode(), v.encode()) for n, v in values.items())
    return [cmd.DefineMacro(_MACRO_COMMAND[stage], pairs)]


def _mta_side(eom_request: pb.ProcessRequest) -> list[tuple[Stage, list[MtaCommand]]]:
    """What an MTA sends for the session the end-of-message example describes, by stage."""
    eom = eom_request.end_of_message
    env = eom.envelope
    stage_macros = {stage: dict(m.values) for stage, m in env.macros.items()}

    def step(stage: Stage, name: str, command: MtaCommand) -> tuple[Stage, list[MtaCommand]]:
        return stage, [*_define(name, stage_macros.get(name, {})), command]

    conn = env.connect
    steps = [
        step(
            Stage.CONNECT,
            "connect",
            cmd.Connect(
                conn.hostname.encode(), _FAMILY[conn.family], conn.port, conn.address.encode()
            ),
        ),
        step(Stage.HELO, "helo", cmd.Helo(env.helo.name.encode())),
        step(
            Stage.MAIL,
            "mail_from",
            cmd.Mail(
                env.mail_from.address.encode(), tuple(a.encode() for a in env.mail_from.esmtp_args)
            ),
        ),
    ]
    steps += [
        step(
            Stage.RCPT,
            "rcpt_to",
            cmd.Rcpt(rcpt.address.encode(), tuple(a.encode() for a in rcpt.esmtp_args)),
        )
        for rcpt in env.recipients
    ]
    steps.append(step(Stage.DATA, "data", cmd.Data()))
    steps += [(Stage.HEADER, [cmd.Header(h.name.encode(), h.value)]) for h in eom.headers]
    steps.append(step(Stage.EOH, "end_of_headers", cmd.EndOfHeaders()))
    if eom.body:
        steps.append((Stage.BODY, [cmd.Body(eom.body)]))
    end = [*_define("end_of_message", dict(eom_request.macros)), cmd.EndOfMessage()]
    steps.append((Stage.EOM, end))
    return steps


@dataclass
class Conversation:
    session: Session
    # What the policy received, by sequence (one stream: the conversation has one SMTP session).
    requests: dict[int, pb.ProcessRequest]


def _take(conversation: Conversation, outputs: list[Output]) -> None:
    for o in outputs:
        if isinstance(o, SendToPolicy):
            assert o.stream == 1, "the page's conversation is one stream"
            conversation.requests[o.request.sequence] = o.request


def replay(until: int | None = None) -> Conversation:
    """The page's conversation through a real Session.

    Every event that awaits an answer gets CONTINUE, except the one with
    sequence ``until``: the replay stops there, with that event pending.
    """
    (capabilities, *_) = _of("Capabilities")
    assert isinstance(capabilities, pb.Capabilities)
    requests = [m for m in _of("ProcessRequest") if isinstance(m, pb.ProcessRequest)]
    starts = [r for r in requests if r.HasField("start")]
    eoms = [r for r in requests if r.end_of_message.HasField("envelope")]
    assert starts, "the page shows no start request"
    assert eoms, "the page shows no end_of_message request with an envelope"
    start = starts[0].start
    plan = Plan.from_capabilities(capabilities, start.fingerprint)
    # The bridge's session ids are "<connection id>.<stream number>".
    session = Session(plan, connection_id=start.session_id.rpartition(".")[0])
    conversation = Conversation(session, {})
    offer: list[MtaCommand] = [OFFER_V6]
    _take(conversation, session.feed(encode_all(offer)))
    negotiation = session.negotiation
    assert negotiation is not None
    for stage, commands in _mta_side(eoms[0]):
        if stage in NO_FLAG and negotiation.reply.protocol & NO_FLAG[stage]:
            continue  # told not to send it: an MTA does not
        _take(conversation, session.feed(encode_all(commands)))
        pending = session.pending
        if pending is not None:
            if pending.sequence == until:
                return conversation
            answer = pb.ProcessResponse(
                sequence=pending.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
            )
            _take(conversation, session.answer(answer))
    assert until is None, f"no event of the page's conversation awaits sequence {until}"
    return conversation


def _map_differences(entry: Descriptor, value: Any, other: Any, where: str) -> Iterator[str]:
    is_message = entry.fields_by_name["value"].message_type is not None
    for key in value:
        if key not in other:
            yield f"{where}[{key!r}]: not sent"
        elif is_message:
            yield from _differences(value[key], other[key], f"{where}[{key!r}]")
        elif value[key] != other[key]:
            yield f"{where}[{key!r}]: {value[key]!r}, the bridge sends {other[key]!r}"


def _differences(example: Message, real: Message, path: str = "") -> Iterator[str]:
    """Where a field the example sets is not what the real message has (maps: by key)."""
    for field, value in example.ListFields():
        where = f"{path}.{field.json_name}" if path else field.json_name
        other = getattr(real, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield from _map_differences(field.message_type, value, other, where)
        elif field.is_repeated:
            if len(value) != len(other):
                yield f"{where}: {len(value)} entries, the bridge sends {len(other)}"
            elif field.message_type is not None:
                for n, (mine, theirs) in enumerate(zip(value, other, strict=True)):
                    yield from _differences(mine, theirs, f"{where}[{n}]")
            elif list(value) != list(other):
                yield f"{where}: {list(value)!r}, the bridge sends {list(other)!r}"
        elif field.message_type is not None:
            if not real.HasField(field.name):
                yield f"{where}: not sent"
            else:
                yield from _differences(value, other, where)
        elif value != other:
            yield f"{where}: {value!r}, the bridge sends {other!r}"


# -- every example, checked by the bridge ----------------------------------------------


def _check_capabilities(capabilities: pb.Capabilities, fingerprint: str = "") -> None:
    # What the bridge does with every Describe answer (upstream/capabilities.py);
    # raises InvalidCapabilitiesError naming the field.
    Plan.from_capabilities(capabilities, fingerprint)


def _check_request(example: pb.ProcessRequest) -> None:
    sent = replay().requests
    real = sent.get(example.sequence)
    assert real is not None, f"no request {example.sequence} from the session: {sorted(sent)}"
    assert list(_differences(example, real)) == []
    # A false reply_expected does not show in JSON: compare it, and the event, in any case.
    assert (example.reply_expected, example.WhichOneof("event")) == (
        real.reply_expected,
        real.WhichOneof("event"),
    )


def _check_response(example: pb.ProcessResponse) -> None:
    session = replay(until=example.sequence).session
    outputs = session.answer(example)  # raises InvalidAnswer when the bridge refuses it
    if example.HasField("progress"):
        assert outputs == [ProgressToMta()]
        assert session.pending is not None  # still awaits the final answer
    else:
        assert session.pending is None
        assert any(isinstance(o, SendToMta) for o in outputs)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_example_passes_the_bridges_own_checks(example: Example) -> None:
    message = example.parse()
    if isinstance(message, pb.DescribeResponse):
        _check_capabilities(message.capabilities, message.fingerprint)
    elif isinstance(message, pb.Capabilities):
        _check_capabilities(message)
    elif isinstance(message, pb.ProcessRequest):
        _check_request(message)
    elif isinstance(message, pb.ProcessResponse):
        _check_response(message)
    else:
        pytest.fail(f"no check for {example.name} examples: add one to tests/test_docs.py")
