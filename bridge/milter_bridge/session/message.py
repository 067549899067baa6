"""The message being assembled: what a session holds of one message, from MAIL FROM to
its end.

One object per message: the session replaces it at each reset (MAIL FROM, the answer
to end of message, ABORT, a new SMTP session), so nothing of one message can leak
into the next. What it holds for the policy (the sender, the recipients, the headers
and a buffered body for EndOfMessage) is cut at the session's limits, and the policy
is told (``*_truncated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milter_bridge.v1 import policy_pb2 as pb


@dataclass(frozen=True, slots=True)
class Limits:
    """Memory per connection: what one message may hold for the policy."""

    max_headers: int
    max_header_buffer: int
    max_recipients: int
    max_recipient_buffer: int
    body_limit: int


@dataclass(slots=True)
class Message:
    # (reason, cause) once the policy failed on this message: it sees no more of it.
    failure: tuple[str, str] | None = None
    done: bool = False  # the policy decided the whole message before its end
    seen: bool = False  # an event of it went to the policy (so an ABORT is worth telling)
    skip_body: bool = False  # the policy answered SKIP to a body chunk
    mail: pb.MailFrom | None = None
    recipients: list[pb.RcptTo] = field(default_factory=list)  # for EndOfMessage.envelope
    recipient_bytes: int = 0
    recipients_truncated: bool = False
    holds_last_recipient: bool = False  # the last RCPT is in ``recipients``
    headers: list[pb.Header] = field(default_factory=list)
    header_bytes: int = 0
    headers_truncated: bool = False
    body: bytearray = field(default_factory=bytearray)  # as far as buffered
    body_size: int = 0  # of the whole body, buffered or not

    def add_header(self, header: pb.Header, size: int, limits: Limits) -> None:
        if (
            self.headers_truncated
            or self.header_bytes + size > limits.max_header_buffer
            or len(self.headers) >= limits.max_headers
        ):
            self.headers_truncated = True
            return
        self.header_bytes += size
        self.headers.append(header)

    def add_recipient(self, rcpt: pb.RcptTo, size: int, limits: Limits) -> None:
        self.holds_last_recipient = False
        if self.recipients_truncated:
            return
        if (
            self.recipient_bytes + size > limits.max_recipient_buffer
            or len(self.recipients) >= limits.max_recipients
        ):
            self.recipients_truncated = True
            return
        self.recipient_bytes += size
        self.recipients.append(rcpt)
        self.holds_last_recipient = True

    def refuse_last_recipient(self) -> None:
        """The policy refused the last RCPT: it is no recipient of this message."""
        if self.holds_last_recipient:
            self.recipients.pop()
            self.holds_last_recipient = False

    def add_body(self, chunk: bytes, limits: Limits, *, buffered: bool) -> None:
        self.body_size += len(chunk)
        if buffered:
            room = limits.body_limit - len(self.body)
            self.body += chunk[: max(room, 0)]
