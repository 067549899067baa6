"""An SDK policy that decides at every stage, for black-box runs that reach the bridge's
waits for the policy at each of them (bench/sdk_policy.py decides at end of message only).

    python -m fuzz.every_stage_policy unix:/PATH

Every event awaits an answer: HELO, MAIL, RCPT, DATA, each header, end of
headers, each body chunk, unknown commands. A value holding REJECT is rejected
and one holding TEMPFAIL tempfailed (mutated sessions sometimes make them);
the rest continue, and end of message adds ``X-Fuzz: 1``.
"""

from __future__ import annotations

import sys

from milter_policy import Context, Policy

STAGES = (
    *("connect", "helo", "mail_from", "rcpt_to", "data"),
    *("header", "end_of_headers", "body", "unknown"),
)


def _decide(ctx: Context, *values: object) -> None:
    seen = b" ".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
    if b"REJECT" in seen:
        ctx.reject("marked", code=550, xcode="5.7.1")
    elif b"TEMPFAIL" in seen:
        ctx.tempfail("marked")


def every_stage_policy() -> Policy:
    policy = Policy("fuzz-every-stage")
    for stage in STAGES:
        policy.on(stage, _decide)

    @policy.end_of_message(actions=["add_header"])
    def stamp(ctx: Context) -> None:
        ctx.add_header("X-Fuzz", "1")

    return policy


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m fuzz.every_stage_policy unix:/PATH")
    every_stage_policy().serve(argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
