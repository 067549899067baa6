"""Smoke test through a real Sendmail 8.17: SMTP client -> Sendmail -> bridge -> policy -> sink."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from milter_bridge.v1 import policy_pb2 as pb
from tests.mta.sendmail import Sendmail, SendmailTree, sendmail_cache, unpacked_sendmail
from tests.mta.sink import SmtpSink
from tests.mta.test_postfix_smoke import policy_decision, send
from tests.prerequisites import require
from tests.runtime.stack import Stack, running
from tests.session import harness as h


def require_sendmail() -> SendmailTree:
    """Skip (or, with CI=true, fail) unless root and Sendmail is unpacked.

    Fetching needs the network, which a root test run does not have: .ci/run
    fetches before the tests, by hand: `python -m tests.mta.sendmail`.
    """
    require(root=True, commands=("unshare", "nsenter", "mount", "hostname"))
    tree = unpacked_sendmail()
    if tree is not None:
        return tree
    reason = f"Sendmail is not unpacked in {sendmail_cache()} (python -m tests.mta.sendmail)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing prerequisite in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
async def through_sendmail() -> AsyncIterator[tuple[Stack, Sendmail, SmtpSink]]:
    tree = require_sendmail()
    base = Path(tempfile.mkdtemp(prefix="milter-bridge-sendmail-"))
    base.chmod(0o755)
    caps = h.eom_only()
    caps.actions.CopyFrom(pb.Actions(add_header=True))
    sink = SmtpSink()
    await sink.start()
    async with running(caps) as stack:
        stack.policy.decide = policy_decision
        sendmail = Sendmail(base, f"inet:{stack.bridge.port}@127.0.0.1", sink.port, tree)
        try:
            await sendmail.start()
            yield stack, sendmail, sink
        finally:
            await sendmail.stop()
            await sink.stop()
            shutil.rmtree(base, ignore_errors=True)


async def test_sendmail_delivers_with_header_and_rejects_with_custom_reply(
    through_sendmail: tuple[Stack, Sendmail, SmtpSink],
) -> None:
    stack, sendmail, sink = through_sendmail
    await asyncio.to_thread(send, sendmail.port, "hello")
    delivered = await sink.next()
    assert delivered.header("X-Policy") == ["checked"]
    assert delivered.header("X-Policy-Rcpts") == ["<rcpt@example.test>"]
    assert delivered.header("Subject") == ["hello"]
    assert b"original body line" in delivered.body
    assert delivered.mail_from.startswith("<sender@example.test>")
    assert delivered.rcpt_to == ["<rcpt@example.test>"]

    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(send, sendmail.port, "please REJECTME")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 policy says no"

    # One round trip per message: each stream saw `start` and end_of_message only.
    for stream in stack.policy.streams:
        assert set(stream.events()) <= {"start", "end_of_message"}
    assert sum(e == "end_of_message" for s in stack.policy.streams for e in s.events()) == 2
    # Barrier for "the rejected mail went nowhere": a later marker arrives alone.
    await asyncio.to_thread(send, sendmail.port, "marker")
    assert (await sink.next()).header("Subject") == ["marker"]
    assert sink.messages.empty()
    assert await sendmail.quarantined() == {}
