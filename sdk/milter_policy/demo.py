"""The bundled demo policy: stamps every message with a header. What ``--upstream embedded`` runs.

python -m milter_policy.demo --listen 127.0.0.1:50051
"""

from __future__ import annotations

import argparse

from milter_policy.context import Context
from milter_policy.policy import Policy

policy = Policy("demo")


@policy.end_of_message
def stamp(ctx: Context) -> None:
    """One round trip per message: add a header naming the bridge, then accept."""
    queue_id = ctx.macro("i") or "unknown"
    ctx.add_header("X-Milter-Bridge", f"checked (queue id {queue_id})")
    ctx.accept()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address to serve on")
    policy.serve(parser.parse_args(argv).listen)


if __name__ == "__main__":
    main()
