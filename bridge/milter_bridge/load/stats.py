"""What a load run counts while it runs: one Stats object shared by every connection.

Recording is a few dict and list operations: nothing is formatted per message
except the first few protocol errors, which keep their description.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass
from enum import Enum

from milter_bridge.protocol import replies as r

FIRST_ERRORS = 10  # protocol errors described one by one; the rest are only counted
CONNECTION_FAILED = "connection failed"


class ErrorKind(Enum):
    """Kinds of protocol errors, each counted on its own."""

    MALFORMED = "malformed"  # a packet the codec cannot decode
    NEGOTIATION = "negotiation"  # an OPTNEG reply that breaks the rules
    INVALID = "invalid"  # a reply or modification not valid at its stage
    UNEXPECTED = "unexpected"  # a reply while the MTA waited for none (e.g. to an NR event)
    CLOSED = "closed"  # the milter closed the connection while the MTA waited
    TIMEOUT = "timeout"  # no answer within --timeout


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    kind: ErrorKind
    connection: int
    message: int | None  # the message number (from 0), None outside a message
    stage: str
    text: str


class Stats:
    """Counters of one run; every connection of the run records into the same object."""

    def __init__(self) -> None:
        self.messages = 0
        self.connections = 0
        self.outcomes: Counter[str] = Counter()
        self.refused_recipients: Counter[str] = Counter()
        self.modifications: Counter[str] = Counter()
        self.progress = 0
        self.errors: Counter[ErrorKind] = Counter()
        self.first_errors: list[ErrorRecord] = []
        self.latencies = array("d")  # seconds, one per decided message
        # The slowest single answer of the run (seconds) and its stage, written by the client.
        self.worst_answer = 0.0
        self.worst_answer_stage = ""
        self.negotiations: Counter[r.OptionNegotiationReply] = Counter()
        self.connect_failures: list[str] = []  # the first few, described

    def connect_failed(self, text: str) -> None:
        """No connection to the milter: the message that was to open it ends so."""
        self.outcome(CONNECTION_FAILED)
        if len(self.connect_failures) < FIRST_ERRORS:
            self.connect_failures.append(text)

    def outcome(self, label: str, latency: float | None = None) -> None:
        """A message is over: ``label`` is "STAGE VERDICT" (or how it failed)."""
        self.messages += 1
        self.outcomes[label] += 1
        if latency is not None:
            self.latencies.append(latency)

    def error(
        self, kind: ErrorKind, connection: int, message: int | None, stage: str, text: str
    ) -> None:
        self.errors[kind] += 1
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(ErrorRecord(kind, connection, message, stage, text))

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[max(1, math.ceil(len(ordered) * fraction)) - 1]
