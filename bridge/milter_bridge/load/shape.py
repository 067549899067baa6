"""The messages the load tool sends: headers, body, recipients, and which ones carry the marker.

Everything here is computed once per run; per message only the Subject variant
and the Message-ID change. Which messages are marked is deterministic: message
``k`` (from 0) is marked when ``floor((k + 1) * share)`` exceeds
``floor(k * share)``, so any N consecutive messages hold ``floor(N * share)``
or one more marked ones and the first N hold exactly ``floor(N * share)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

SENDER = b"sender@example.test"
DOMAIN = b"example.test"
SUBJECT = b"load test message"
LINE = 78  # characters per body line before CRLF

# Plausible headers in the order a mail client writes them; Subject first so that
# even --headers 1 carries the marker. X-Load-N fillers follow when more are asked.
_FIXED_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Subject", SUBJECT),
    (b"From", b"Load Sender <" + SENDER + b">"),
    (b"To", b"rcpt1@" + DOMAIN),
    (b"Date", b"Tue, 24 Nov 2026 12:00:00 +0000"),
    (b"Message-ID", b""),  # per message, from the queue id
    (b"MIME-Version", b"1.0"),
    (b"Content-Type", b"text/plain; charset=us-ascii"),
)
SUBJECT_INDEX = 0
MESSAGE_ID_INDEX = 4


class ShapeError(ValueError):
    """A message shape that cannot be built (e.g. a marker share without a Subject)."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What every message looks like."""

    headers: int = 10
    body_size: int = 10240
    recipients: int = 1
    marker_share: Fraction = field(default_factory=Fraction)
    marker: str = "REJECT"

    def __post_init__(self) -> None:
        if self.headers < 0 or self.body_size < 0:
            msg = "--headers and --body-size must not be negative"
            raise ShapeError(msg)
        if self.recipients < 1:
            msg = "--recipients must be at least 1"
            raise ShapeError(msg)
        if not 0 <= self.marker_share <= 1:
            msg = f"--marker-share must be between 0 and 1, not {float(self.marker_share)}"
            raise ShapeError(msg)
        if self.marker_share and self.headers == 0:
            msg = "--marker-share needs at least one header (the Subject carries the marker)"
            raise ShapeError(msg)
        if not self.marker or any(c in self.marker for c in "\0\r\n"):
            msg = "--marker must be a non-empty single line"
            raise ShapeError(msg)

    def marked(self, k: int) -> bool:
        """Whether message ``k`` (counted from 0 over the whole run) carries the marker."""
        p, q = self.marker_share.numerator, self.marker_share.denominator
        return (k + 1) * p // q > k * p // q

    def header_fields(self) -> list[tuple[bytes, bytes]]:
        """(name, value) of every header; Message-ID's value is filled in per message."""
        fields = list(_FIXED_HEADERS[: self.headers])
        fields += [
            (b"X-Load-%d" % n, b"filler header %d for the milter load test" % n)
            for n in range(1, self.headers - len(fields) + 1)
        ]
        return fields

    def marked_subject(self) -> bytes:
        return SUBJECT + b" " + self.marker.encode()

    def recipient(self, n: int) -> bytes:
        """Recipient ``n`` (from 0) as an address without angle brackets."""
        return b"rcpt%d@%s" % (n + 1, DOMAIN)

    def body(self) -> bytes:
        """``body_size`` bytes of CRLF-terminated text lines."""
        line = (b"load test body line " * 8)[:LINE] + b"\r\n"
        whole, rest = divmod(self.body_size, len(line))
        body = line * whole
        if rest == 1:  # one line longer by a character (a single byte cannot end in CRLF)
            body = body[:-2] + b"e\r\n" if whole else b"e"
        elif rest:
            body += line[: rest - 2] + b"\r\n"
        return body

    def body_chunks(self, chunk_size: int) -> list[bytes]:
        """The body cut as Postfix cuts it: full chunks of ``chunk_size``, then the rest."""
        body = self.body()
        return [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
