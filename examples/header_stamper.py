"""Stamp every message with an X-Filtered-By header naming this policy and the queue id.

The smallest useful policy: one handler, at end of message, and nothing else.
Because no other event has a handler and the handler needs neither the
envelope nor the headers, the bridge tells the MTA to send nothing but end of
message: one round trip per message.

    python examples/header_stamper.py --listen 127.0.0.1:50051
"""

from __future__ import annotations

import argparse

from milter_policy import Context, Policy

HEADER = "X-Filtered-By"

# Postfix sends the queue id (macro "i") at end of message by default
# (milter_end_of_data_macros); asking for it makes Sendmail send it there, too.
policy = Policy("header-stamper", macros={"end_of_message": ["i"]})


# envelope=False, headers=False: nothing collected for the handler, so the MTA
# sends only end of message. actions: the only modification this policy makes.
@policy.end_of_message(envelope=False, headers=False, actions=["add_header"])
def stamp(ctx: Context) -> None:
    queue_id = ctx.macro("i")
    value = policy.name if queue_id is None else f"{policy.name} (queue id {queue_id})"
    ctx.add_header(HEADER, value)
    # No verdict set: the message continues (is accepted) with the header added.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="[::]:50051", help="gRPC address to serve on")
    args = parser.parse_args(argv)
    policy.serve(args.listen)


if __name__ == "__main__":
    main()
