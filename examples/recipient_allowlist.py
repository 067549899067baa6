"""Refuse recipients that are not on an allow-list, at RCPT TO, with "550 5.1.1".

The allow-list holds whole addresses (``bob@example.org``) and domains
(``example.com``: every address there). It comes from, the first that is set:

1. ``--allow ADDRESS_OR_DOMAIN`` on the command line (repeatable),
2. the environment variable ``ALLOWED_RECIPIENTS`` (comma- or space-separated),
3. ``DEFAULT_ALLOWED`` in this file.

Only RCPT TO has a handler, so the MTA sends only RCPT TO and waits for its
answer; a refusal there refuses that one recipient, the others go on.

    ALLOWED_RECIPIENTS="example.org, ceo@example.net" python examples/recipient_allowlist.py
    python examples/recipient_allowlist.py --allow example.org --allow ceo@example.net
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from milter_policy import Context, Policy

DEFAULT_ALLOWED = frozenset({"example.org", "postmaster@example.net"})
ENV_VAR = "ALLOWED_RECIPIENTS"


def parse_allowlist(entries: Iterable[str]) -> set[str]:
    """Normalised entries: lower case, without angle brackets; empty ones dropped."""
    return {bare(entry) for entry in entries if bare(entry)}


def bare(address: str) -> str:
    """``<Bob@Example.ORG>`` -> ``bob@example.org``."""
    return address.strip().removeprefix("<").removesuffix(">").lower()


# The allow-list in use; main() replaces its contents from the command line.
ALLOWED: set[str] = parse_allowlist(
    os.environ.get(ENV_VAR, "").replace(",", " ").split() or DEFAULT_ALLOWED
)

policy = Policy("recipient-allowlist")


def is_allowed(address: str) -> bool:
    mailbox = bare(address)
    _, at, domain = mailbox.rpartition("@")
    return mailbox in ALLOWED or (bool(at) and domain in ALLOWED)


@policy.rcpt_to
def check_recipient(ctx: Context, address: str, args: list[str]) -> None:  # noqa: ARG001
    # `address` is as the MTA sent it, normally in angle brackets.
    if not is_allowed(address):
        ctx.reject("mailbox unavailable", code=550, xcode="5.1.1")
    # No verdict set: the recipient is accepted (continue).


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="[::]:50051", help="gRPC address to serve on")
    parser.add_argument(
        "--allow",
        action="append",
        metavar="ADDRESS_OR_DOMAIN",
        help=f"allowed recipient address or domain (repeatable; replaces ${ENV_VAR})",
    )
    args = parser.parse_args(argv)
    if args.allow:
        ALLOWED.clear()
        ALLOWED.update(parse_allowlist(args.allow))
    policy.serve(args.listen)


if __name__ == "__main__":
    main()
