"""What a black-box run saw: counts of connections and how they ended, and the findings
(hangs, replies that do not decode, connections refused), each with the input's name
(SEED:INDEX) so that it can be replayed."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from fuzz.exchange import Ending, Outcome
from fuzz.inputs import FuzzInput

KEEP = 20  # findings listed by name; the rest are only counted


@dataclass(slots=True)
class Summary:
    target: str
    seed: int
    connections_at_once: int
    hang_after_s: float
    connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    replies: int = 0
    ended: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Ending, 0))
    cut_short: int = 0  # the bridge closed before it had taken the whole input
    slowest_close_ms: float = 0.0  # from the fuzzer's EOF, of connections that closed
    kinds: dict[str, int] = field(default_factory=dict)  # inputs with each mutation
    hangs: list[str] = field(default_factory=list)
    bad_replies: list[str] = field(default_factory=list)
    bad_reply_count: int = 0
    elapsed_s: float = 0.0

    def add(self, item: FuzzInput, outcome: Outcome) -> None:
        self.connections += 1
        self.bytes_sent += outcome.sent
        self.bytes_received += outcome.received
        self.replies += outcome.replies
        self.ended[outcome.ending] += 1
        self.cut_short += outcome.cut_short
        for kind in item.kinds or ("(none)",):
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if outcome.ending is Ending.HANG:
            if len(self.hangs) < KEEP:
                self.hangs.append(item.name)
        else:
            self.slowest_close_ms = max(self.slowest_close_ms, round(outcome.after_eof * 1000, 1))
        if outcome.bad_reply is not None:
            self.bad_reply_count += 1
            if len(self.bad_replies) < KEEP:
                self.bad_replies.append(f"{item.name}: {outcome.bad_reply}")

    @property
    def ok(self) -> bool:
        """No hang, every reply decoded, every connection accepted (a bridge that crashed
        refuses the ones after)."""
        return (
            self.ended[Ending.HANG] == 0
            and self.bad_reply_count == 0
            and self.ended[Ending.CONNECT_FAILED] == 0
        )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)

    def text(self) -> str:
        lines = [
            f"black-box fuzz of {self.target}: seed {self.seed},"
            f" {self.connections_at_once} connections at once for {self.elapsed_s:.1f} s",
            f"connections (inputs): {self.connections} ({self.seed}:0 .. {self.seed}:"
            f"{max(0, self.connections - 1)})",
            f"bytes sent {self.bytes_sent}, received {self.bytes_received},"
            f" replies decoded {self.replies}",
            "ended:",
            *(f"  {ending}: {n}" for ending, n in self.ended.items()),
            f"bridge closed before taking the whole input: {self.cut_short}",
            f"slowest close after the fuzzer's EOF: {self.slowest_close_ms} ms"
            f" (a hang: none within {self.hang_after_s:g} s)",
            "mutations: " + ", ".join(f"{k} {n}" for k, n in Counter(self.kinds).most_common()),
            f"hangs: {self.ended[Ending.HANG]} {self.hangs}",
            f"undecodable replies: {self.bad_reply_count} {self.bad_replies}",
            "OK" if self.ok else "FINDINGS: replay one with --replay SEED:INDEX",
        ]
        return "\n".join(lines)
