"""The benchmark policy on pymilter, with every callback registered.

    python -m bench.pymilter_policy unix:/PATH MARKER

Adds ``X-Bench: 1`` at end of message, or rejects with ``550 5.7.1 marked`` when
a Subject contains MARKER. Every callback is overridden although the policy
needs only header and end of message: pymilter asks the MTA not to send
(SMFIP_NO*) the events whose method is left as Milter.Base's, so this milter
receives, and answers, every event, as bench/c_policy.c does.
"""

from __future__ import annotations

import sys

import Milter

# pymilter has no type information; its constants are ints.
CONTINUE: int = Milter.CONTINUE
REJECT: int = Milter.REJECT


class BenchPolicy(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    marker = "REJECT"

    def __init__(self) -> None:
        self.marked = False

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:  # noqa: ARG002
        return CONTINUE

    def hello(self, hostname: str) -> int:  # noqa: ARG002
        return CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:  # noqa: ARG002
        self.marked = False  # a new message
        return CONTINUE

    def envrcpt(self, recipient: str, *params: str) -> int:  # noqa: ARG002
        return CONTINUE

    def data(self) -> int:
        return CONTINUE

    def header(self, name: str, value: str) -> int:
        if name.lower() == "subject" and self.marker in value:
            self.marked = True
        return CONTINUE

    def eoh(self) -> int:
        return CONTINUE

    def body(self, chunk: bytes) -> int:  # noqa: ARG002
        return CONTINUE

    def eom(self) -> int:
        if self.marked:
            self.setreply("550", "5.7.1", "marked")
            return REJECT
        self.addheader("X-Bench", "1")
        return CONTINUE

    def abort(self) -> int:
        self.marked = False
        return CONTINUE

    def close(self) -> int:
        return CONTINUE

    def unknown(self, command: str) -> int:  # noqa: ARG002
        return CONTINUE


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m bench.pymilter_policy unix:/PATH MARKER")
    socket, BenchPolicy.marker = argv
    Milter.factory = BenchPolicy
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("bench", socket)


if __name__ == "__main__":
    main(sys.argv[1:])
