"""Smoke test through a real Postfix: SMTP client -> Postfix -> bridge -> policy -> sink."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import tempfile
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from milter_bridge.v1 import policy_pb2 as pb
from tests.mta.postfix import Postfix
from tests.mta.sink import SmtpSink
from tests.prerequisites import require
from tests.runtime.stack import Stack, running
from tests.session import harness as h


async def policy_decision(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
    """Add a header to every message; refuse a subject with REJECTME, with a custom reply."""
    eom = request.end_of_message
    subject = next((x.value for x in eom.headers if x.name.lower() == "subject"), b"")
    if b"REJECTME" in subject:
        reply = pb.SmtpReply(code=550, enhanced_code="5.7.1", lines=["policy says no"])
        verdict = pb.Verdict(action=pb.ACTION_REJECT, reply=reply)
        return [pb.ProcessResponse(sequence=request.sequence, verdict=verdict)]
    rcpts = ",".join(x.address for x in eom.envelope.recipients)
    answer = pb.EndOfMessageResponse(
        modifications=[
            pb.Modification(add_header=pb.AddHeader(name="X-Policy", value=b"checked")),
            pb.Modification(add_header=pb.AddHeader(name="X-Policy-Rcpts", value=rcpts.encode())),
        ],
        verdict=pb.Verdict(action=pb.ACTION_ACCEPT),
    )
    return [pb.ProcessResponse(sequence=request.sequence, end_of_message=answer)]


@pytest.fixture
async def through_postfix() -> AsyncIterator[tuple[Stack, Postfix, SmtpSink]]:
    require(root=True, commands=("postfix",))
    # Postfix's own users must reach the instance: pytest's tmp_path is 0700.
    base = Path(tempfile.mkdtemp(prefix="milter-bridge-postfix-"))
    base.chmod(0o755)
    caps = h.eom_only()
    caps.actions.CopyFrom(pb.Actions(add_header=True))
    sink = SmtpSink()
    await sink.start()
    async with running(caps) as stack:
        stack.policy.decide = policy_decision
        postfix = Postfix(base, f"inet:127.0.0.1:{stack.bridge.port}", sink.port)
        try:
            await postfix.start()
            yield stack, postfix, sink
        finally:
            await postfix.stop()
            await sink.stop()
            shutil.rmtree(base, ignore_errors=True)


def send(port: int, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "sender@example.test"
    message["To"] = "rcpt@example.test"
    message["Subject"] = subject
    message.set_content("original body line\n")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as smtp:
        smtp.send_message(message)


async def test_postfix_delivers_with_header_and_rejects_with_custom_reply(
    through_postfix: tuple[Stack, Postfix, SmtpSink],
) -> None:
    stack, postfix, sink = through_postfix
    await asyncio.to_thread(send, postfix.port, "hello")
    delivered = await sink.next()
    assert delivered.header("X-Policy") == ["checked"]
    assert delivered.header("X-Policy-Rcpts") == ["<rcpt@example.test>"]
    assert delivered.header("Subject") == ["hello"]
    assert b"original body line" in delivered.body

    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(send, postfix.port, "please REJECTME")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 policy says no"

    # One round trip per message: each stream saw `start` and end_of_message only.
    for stream in stack.policy.streams:
        assert set(stream.events()) <= {"start", "end_of_message"}
    assert sum(e == "end_of_message" for s in stack.policy.streams for e in s.events()) == 2
    # Barrier for "the rejected mail went nowhere": a later marker arrives alone.
    await asyncio.to_thread(send, postfix.port, "marker")
    assert (await sink.next()).header("Subject") == ["marker"]
    assert sink.messages.empty()
