"""Run a Policy through a whole SMTP conversation without a bridge or an MTA.

    result = check(policy, sender="<a@example.org>", recipients=["<b@example.net>"],
                   headers=[("Subject", "hello")], body=b"hi\\r\\n")
    assert result.final.action == ACTION_ACCEPT

The requests are made as the bridge makes them for this policy's capabilities
(events it does not want are not sent) and go through the same Dispatcher
that serve() uses.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from milter_bridge.v1 import policy_pb2 as pb
from milter_policy.dispatch import Dispatcher
from milter_policy.policy import Policy

__all__ = ["Result", "check", "check_async", "check_eml"]

CHUNK = 65535


@dataclass
class Result:
    """What the policy answered, per event kind (the last answer of that kind wins)."""

    verdicts: dict[str, pb.Verdict] = field(default_factory=dict)
    modifications: list[pb.Modification] = field(default_factory=list)
    progress: int = 0
    # The final verdict: the first refusal, else end of message's answer, else continue.
    final: pb.Verdict = field(default_factory=lambda: pb.Verdict(action=pb.ACTION_CONTINUE))
    requests: list[pb.ProcessRequest] = field(default_factory=list)


def _refusal(verdict: pb.Verdict) -> bool:
    return verdict.action in (
        pb.ACTION_REJECT,
        pb.ACTION_TEMPFAIL,
        pb.ACTION_DISCARD,
        pb.ACTION_ACCEPT,
    )


async def check_async(  # noqa: PLR0915 - one SMTP conversation, step by step
    policy: Policy,
    *,
    sender: str = "<sender@example.test>",
    recipients: Sequence[str] = ("<rcpt@example.test>",),
    headers: Sequence[tuple[str, str | bytes]] = (),
    body: bytes = b"",
    client: tuple[str, str] = ("client.example.test", "192.0.2.1"),
    helo: str = "client.example.test",
    macros: dict[str, dict[str, str]] | None = None,
) -> Result:
    """One SMTP conversation through the policy; its verdicts and modifications."""
    caps = policy.capabilities()
    modes = caps.events
    result = Result()
    dispatcher = Dispatcher(
        policy, None, on_progress=lambda _: setattr(result, "progress", result.progress + 1)
    )
    sequence = 1
    stage_macros = macros or {}
    start = pb.StreamStart(fingerprint=policy.fingerprint, capabilities=caps, session_id="test.1")
    start.negotiated.protocol_version = 6
    start.negotiated.actions.CopyFrom(caps.actions)  # an MTA that grants what is asked
    await dispatcher.handle(pb.ProcessRequest(sequence=sequence, start=start))

    hdrs = [pb.Header(name=n, value=v.encode() if isinstance(v, str) else v) for n, v in headers]
    connect = pb.Connect(
        hostname=client[0], address=client[1], family=pb.ADDRESS_FAMILY_INET, port=25
    )
    mail = pb.MailFrom(address=sender)
    rcpts = [pb.RcptTo(address=r) for r in recipients]
    steps: list[tuple[str, str, object]] = [
        ("connect", "connect", connect),
        ("helo", "helo", pb.Helo(name=helo)),
        ("mail_from", "mail_from", mail),
        *(("rcpt_to", "rcpt_to", r) for r in rcpts),
        ("data", "data", pb.Data()),
    ]
    batch = caps.header_delivery == pb.HEADER_DELIVERY_BATCH
    if not batch:
        steps += [("header", "header", h) for h in hdrs]
    steps.append(
        ("end_of_headers", "end_of_headers", pb.EndOfHeaders(headers=hdrs if batch else []))
    )
    steps += [
        ("body", "body_chunk", pb.BodyChunk(data=body[i : i + CHUNK]))
        for i in range(0, len(body), CHUNK)
    ]
    eom = pb.EndOfMessage(body_size=len(body))
    if caps.end_of_message_content.envelope:
        eom.envelope.connect.CopyFrom(connect)
        eom.envelope.helo.name = helo
        eom.envelope.mail_from.CopyFrom(mail)
        eom.envelope.recipients.extend(rcpts)
    if caps.end_of_message_content.headers:
        eom.headers.extend(hdrs)
    if caps.body_delivery == pb.BODY_DELIVERY_BUFFERED:
        eom.body = body[: caps.body_limit]
        eom.body_truncated = len(body) > caps.body_limit
    steps.append(("end_of_message", "end_of_message", eom))

    for mode_name, field_name, message in steps:
        mode = getattr(modes, mode_name if mode_name != "header" or not batch else "end_of_headers")
        if batch and mode_name == "end_of_headers":
            mode = max(modes.header, modes.end_of_headers)
        if mode == pb.EVENT_MODE_SKIP:
            continue
        sequence += 1
        request = pb.ProcessRequest(sequence=sequence, reply_expected=mode == pb.EVENT_MODE_DECIDE)
        request.macros.update(stage_macros.get(mode_name, {}))
        getattr(request, field_name).CopyFrom(message)
        result.requests.append(request)
        for response in await dispatcher.handle(request):
            kind = response.WhichOneof("response")
            verdict = (
                response.end_of_message.verdict if kind == "end_of_message" else response.verdict
            )
            result.verdicts[mode_name] = verdict
            if kind == "end_of_message":
                result.modifications = list(response.end_of_message.modifications)
            if _refusal(verdict) or mode_name == "end_of_message":
                result.final = verdict
                if verdict.action != pb.ACTION_CONTINUE and mode_name != "rcpt_to":
                    await dispatcher.close()
                    return result
    await dispatcher.close()
    return result


def check(policy: Policy, **conversation: object) -> Result:
    """check_async() for plain (non-async) test code."""
    return asyncio.run(check_async(policy, **conversation))  # type: ignore[arg-type]


def check_eml(policy: Policy, path: str | Path, **conversation: object) -> Result:
    """A message file (.eml) through the policy: its headers and body, From/To as the envelope."""
    raw = Path(path).read_bytes()
    _head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    headers = [(n, str(v).encode()) for n, v in message.items()]
    conversation.setdefault("sender", f"<{email.utils.parseaddr(message.get('From', ''))[1]}>")
    conversation.setdefault("recipients", [f"<{email.utils.parseaddr(message.get('To', ''))[1]}>"])
    return check(policy, headers=headers, body=body.replace(b"\n", b"\r\n"), **conversation)
