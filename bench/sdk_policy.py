"""The benchmark policy on the SDK, served in its own process as a user's policy is.

    python -m bench.sdk_policy unix:/PATH MARKER

Adds ``X-Bench: 1`` at end of message, or rejects with ``550 5.7.1 marked`` when
a Subject contains MARKER. One ``async`` end-of-message handler that asks for
the headers only: the bridge then tells the MTA to send the headers without
waiting for answers and end of message, one policy round trip per message.
Served with ``Policy.serve`` and its defaults (INFO logging included), because
that is what the benchmark is to measure.
"""

from __future__ import annotations

import sys

from milter_policy import Context, Policy


def bench_policy(marker: str) -> Policy:
    policy = Policy("bench")
    needle = marker.encode()

    # envelope=False: the policy needs no envelope, so the bridge asks for none of it.
    @policy.end_of_message(envelope=False, headers=True, actions=["add_header"])
    async def decide(ctx: Context) -> None:
        if any(needle in value for value in ctx.header("Subject")):
            ctx.reject("marked", code=550, xcode="5.7.1")
        else:
            ctx.add_header("X-Bench", "1")  # no verdict: the message continues

    return policy


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m bench.sdk_policy unix:/PATH MARKER")
    address, marker = argv
    bench_policy(marker).serve(address)


if __name__ == "__main__":
    main(sys.argv[1:])
