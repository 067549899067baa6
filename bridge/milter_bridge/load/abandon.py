"""Messages the MTA abandons mid-way: which ones, and at which point of the message.

An MTA whose connection to the milter ends in the middle of a message (its
process killed, its SMTP client gone and the session torn down) is a case every
milter meets; the load tool plays it for ``share`` of the messages. Message
``k`` (from 0) is abandoned when ``floor((k + 2) * share)`` exceeds
``floor((k + 1) * share)``: the marker's rule (shape.py) one message further
on, so that a marker share and an abandon share of the form 1/n (n > 1) never
pick the same message (marked: n-1, 2n-1, ...; abandoned: n-2, 2n-2, ...) and
neither hides the other. Any N consecutive messages hold ``floor(N * share)``
abandoned ones or one more.

The abandoned messages take the points below in turn, the first abandoned
message the first point, among those the negotiation makes reachable (an event
the milter opted out of is not sent, so nothing is abandoned after it; end of
message is always sent). At each point what is written so far goes out and the
connection ends at once, no answer awaited:

- mail, rcpt, data, eoh: after MAIL, the first RCPT, DATA, end of headers;
- header: in the middle of the headers, after the first half of them (10: 5,
  the first 4 answered when headers are answered one by one);
- body: in the middle of the body: the chunks before the middle one, then the
  first half of that chunk's packet (a packet cut in two, as when the MTA dies
  in the middle of a write);
- eom: right after end of message.

A message that the milter ends before its point (a REJECT at RCPT, say) ends
with that verdict as usual and is not abandoned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from milter_bridge.load.verdicts import Stage

HOWS = ("fin", "rst")  # how the connection ends: wire.py, Wire.abandon
_OFFSET = 1  # message k is picked as the marker would pick message k + 1


@dataclass(frozen=True, slots=True)
class Abandon:
    """Which messages the MTA leaves mid-way, and how (``"fin"`` or ``"rst"``)."""

    share: Fraction = field(default_factory=Fraction)
    how: str = "fin"

    def point(self, k: int, points: tuple[Stage, ...]) -> Stage | None:
        """Where message ``k`` is abandoned among ``points`` (a plan's), or None."""
        p, q = self.share.numerator, self.share.denominator
        before = (k + _OFFSET) * p // q  # abandoned messages before k, plus floor(share)
        if (k + _OFFSET + 1) * p // q == before:
            return None
        return points[(before - _OFFSET * p // q) % len(points)]

    def label(self, stage: Stage) -> str:
        """The outcome of a message abandoned at ``stage``, e.g. "abandoned header rst"."""
        return f"abandoned {stage.value} {self.how}"
