"""A real SMTP client session (smtplib, in a thread) that records the reply at every step."""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass, field

Reply = tuple[int, bytes]


@dataclass
class Transcript:
    """What the client saw: the reply to each step it got to."""

    greeting: Reply | None = None
    helo: Reply | None = None
    mail: Reply | None = None
    rcpt: list[Reply] = field(default_factory=list)
    data: Reply | None = None
    second: list[Reply] = field(default_factory=list)  # a second message on the connection

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


@dataclass
class Message:
    subject: str = "test"
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b"original body line\r\n"
    mail_from: str = "sender@example.test"
    rcpts: list[str] = field(default_factory=lambda: ["rcpt@example.test"])
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)

    def raw(self) -> bytes:
        head = [
            b"From: " + self.mail_from.encode(),
            b"To: " + ", ".join(self.rcpts).encode(),
            b"Subject: " + self.subject.encode(),
            *(name.encode() + b": " + value for name, value in self.headers),
        ]
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body


def _session(port: int, messages: list[Message], transcript: Transcript, *, rset: bool) -> None:
    smtp = smtplib.SMTP(timeout=120)
    try:
        transcript.greeting = smtp.connect("127.0.0.1", port)
        if transcript.greeting[0] != 220:
            return
        transcript.helo = smtp.ehlo("client.example.test")
        if transcript.helo[0] != 250:
            return
        for n, message in enumerate(messages):
            replies: list[Reply] = []
            mail = smtp.mail(message.mail_from, message.mail_options)
            replies.append(mail)
            rcpts = [smtp.rcpt(r, message.rcpt_options) for r in message.rcpts]
            data = None
            if mail[0] == 250 and any(code == 250 for code, _ in rcpts):
                try:
                    data = smtp.data(message.raw())
                except smtplib.SMTPDataError as refused:  # DATA itself refused (no 354)
                    error = refused.smtp_error
                    data = (
                        refused.smtp_code,
                        error if isinstance(error, bytes) else error.encode(),
                    )
            if n == 0:
                transcript.mail, transcript.rcpt, transcript.data = mail, rcpts, data
            else:
                transcript.second = [mail, *rcpts, *([data] if data else [])]
            if rset:
                smtp.rset()
        smtp.quit()
    except smtplib.SMTPServerDisconnected:
        pass  # what the client saw so far is in the transcript
    finally:
        smtp.close()


async def send(port: int, *messages: Message, rset: bool = False) -> Transcript:
    """One SMTP connection sending the messages; never raises for SMTP replies."""
    transcript = Transcript()
    await asyncio.to_thread(_session, port, list(messages) or [Message()], transcript, rset=rset)
    return transcript
