"""Envelope and body modifications, per-message state, macros: what the MTA delivers."""

from __future__ import annotations

import pytest

from milter_bridge.v1 import policy_pb2 as pb
from tests.conformance.conftest import CAPABILITIES, World, described
from tests.conformance.mods import HEADERS, M, at_end, modified
from tests.conformance.smtp import Message, send

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_add_recipient_without_and_with_esmtp_args(fresh: World, mta_name: str) -> None:
    delivered = await modified(
        fresh,
        mta_name,
        M(add_recipient=pb.AddRecipient(address="<plain@example.test>")),
        M(add_recipient=pb.AddRecipient(address="<dsn@example.test>", esmtp_args=["NOTIFY=NEVER"])),
    )
    assert sorted(delivered.recipients) == [
        "<dsn@example.test>",
        "<plain@example.test>",
        "<rcpt@example.test>",
    ]
    (dsn,) = [r for r in delivered.rcpt_to if r.startswith("<dsn@")]
    assert "NOTIFY=NEVER" in dsn  # the ESMTP argument reached the next hop


async def test_delete_recipient(fresh: World, mta_name: str) -> None:
    message = Message(headers=HEADERS, rcpts=["keep@example.test", "drop@example.test"])
    delivered = await modified(
        fresh,
        mta_name,
        M(delete_recipient=pb.DeleteRecipient(address="<drop@example.test>")),
        message=message,
    )
    assert delivered.recipients == ["<keep@example.test>"]


async def test_change_sender_without_and_with_args(fresh: World, mta_name: str) -> None:
    plain = await modified(
        fresh, mta_name, M(change_sender=pb.ChangeSender(address="<new@example.test>"))
    )
    assert plain.sender == "<new@example.test>"
    with_args = await modified(
        fresh,
        mta_name,
        M(change_sender=pb.ChangeSender(address="<ret@example.test>", esmtp_args=["RET=HDRS"])),
    )
    assert with_args.sender == "<ret@example.test>"
    assert "RET=HDRS" in with_args.mail_from


@pytest.mark.parametrize("size", [40, 200_000], ids=["small", "over-64KiB"])
async def test_replace_body_with_non_ascii_bytes(fresh: World, mta_name: str, size: int) -> None:
    line = "Grüße, ça va? 日本語 ".encode() + b"\xff\xfe raw\r\n"
    body = (line * (size // len(line) + 1))[:size]
    body = body[: body.rfind(b"\r\n") + 2]  # whole lines
    delivered = await modified(fresh, mta_name, M(replace_body=pb.ReplaceBody(body=body)))
    assert delivered.body == body


async def test_two_messages_on_one_connection_only_the_first_modified(
    fresh: World, mta_name: str
) -> None:
    seen: list[str] = []

    async def first_only(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        event = str(request.WhichOneof("event"))
        seen.append(event)
        if event == "end_of_message" and seen.count("end_of_message") == 1:
            eom = request.end_of_message
            assert [r.address for r in eom.envelope.recipients] == ["<one@example.test>"]
            return await at_end(M(add_header=pb.AddHeader(name="X-First", value=b"yes")))(request)
        if event == "end_of_message":  # the second message: its own envelope only
            assert [r.address for r in request.end_of_message.envelope.recipients] == [
                "<two@example.test>"
            ]
        return [
            pb.ProcessResponse(
                sequence=request.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
            )
        ]

    fresh.policy.decide = first_only
    one = Message(subject="one", rcpts=["one@example.test"])
    two = Message(subject="two", rcpts=["two@example.test"])
    transcript = await send(fresh.mtas[mta_name].port, one, two, rset=True)
    assert transcript.accepted
    assert transcript.second[-1][0] == 250
    first, second = await fresh.sink.next(), await fresh.sink.next()
    if first.header("Subject") == ["two"]:
        first, second = second, first
    assert first.header("X-First") == ["yes"]
    assert second.header("X-First") == []
    assert seen.count("mail_from") == 2


# The macros each stage must carry (asked for in conftest.CAPABILITIES).
MACROS = {
    "connect": {"j", "daemon_name", "client_addr"},
    "mail_from": {"mail_addr"},
    "rcpt_to": {"rcpt_addr"},
    "end_of_message": {"i", "j"},
}
# The first stage with the queue id {i}: Postfix has it only after the first
# accepted recipient, Sendmail from MAIL FROM on.
QUEUE_ID_FROM = {"postfix": "data", "sendmail": "mail_from"}


async def macros_by_stage(world: World, mta_name: str) -> dict[str, dict[str, str]]:
    """One message through the MTA; the macros the policy got with the first event of each kind."""
    by_stage: dict[str, dict[str, str]] = {}

    async def record(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        by_stage.setdefault(str(request.WhichOneof("event")), dict(request.macros))
        return [
            pb.ProcessResponse(
                sequence=request.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
            )
        ]

    world.policy.decide = record
    assert (await send(world.mtas[mta_name].port, Message())).accepted
    await world.sink.next()
    return by_stage


async def test_macros_arrive_at_their_stage(fresh: World, mta_name: str) -> None:
    by_stage = await macros_by_stage(fresh, mta_name)
    for stage, names in MACROS.items():
        assert names <= by_stage[stage].keys(), (stage, by_stage[stage])
    assert by_stage["connect"]["client_addr"] == "127.0.0.1"
    assert by_stage["mail_from"]["mail_addr"] == "sender@example.test"
    assert by_stage["rcpt_to"]["rcpt_addr"] == "rcpt@example.test"
    queue_id = by_stage["end_of_message"]["i"]
    assert by_stage[QUEUE_ID_FROM[mta_name]]["i"] == queue_id
    if mta_name == "postfix":
        assert "i" not in by_stage["rcpt_to"]  # the first recipient: no queue id yet


def macros_only(**stages: list[str]) -> pb.Capabilities:
    """The world's capabilities, but asking for macros at these stages only."""
    capabilities = pb.Capabilities()
    capabilities.CopyFrom(CAPABILITIES)
    capabilities.macros.CopyFrom(pb.MacroRequest(**stages))
    return capabilities


async def test_end_of_message_macros_alone_arrive_at_end_of_message(
    fresh: World, mta_name: str
) -> None:
    # docs/policy-api.md's own example. Sendmail uses a milter's end-of-message list
    # only when it also got an end-of-headers list from it; alone, the policy got
    # Sendmail's Milter.macros.eom ({msg_id}) instead.
    async with described(fresh, macros_only(end_of_message=["i", "j", "{msg_id}"])):
        by_stage = await macros_by_stage(fresh, mta_name)
    eom = by_stage["end_of_message"]
    assert {"i", "j"} <= eom.keys(), eom
    if mta_name == "sendmail":  # Postfix does not define {msg_id}
        assert eom["msg_id"].startswith("<"), eom


# The end-of-message list the bridge sends along with a policy's end-of-headers
# one is Sendmail's default, {msg_id}, which Postfix does not define.
EOM_WITH_EOH_ONLY = {"sendmail": {"msg_id"}, "postfix": set()}


async def test_end_of_headers_macros_alone_arrive_at_end_of_headers(
    fresh: World, mta_name: str
) -> None:
    async with described(fresh, macros_only(end_of_headers=["i", "j"])):
        by_stage = await macros_by_stage(fresh, mta_name)
    eoh = by_stage["end_of_headers"]
    assert {"i", "j"} <= eoh.keys(), eoh
    # Without the end-of-message list Sendmail would use this milter's own, unset one.
    assert set(by_stage["end_of_message"]) == EOM_WITH_EOH_ONLY[mta_name], by_stage
