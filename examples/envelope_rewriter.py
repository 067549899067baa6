"""Rewrite the envelope: map senders, copy every message to an archive, drop no-reply recipients.

At end of message, with the envelope collected by the bridge (``ctx.envelope``,
addresses as the MTA sent them, normally in angle brackets):

* a sender in ``SENDER_MAP`` is replaced (``set_sender``) with its mapped
  address, and ESMTP ``RET=HDRS``: bounces to the shared address carry only
  the headers of the message, not its content;
* ``ARCHIVE`` is added as a recipient of every message, with
  ``NOTIFY=NEVER`` so the archive copy never causes a delivery notification;
* recipients whose mailbox is in ``DROP_MAILBOXES`` (``<noreply@...>``) are
  removed (the message still goes to the others and to the archive).

    python examples/envelope_rewriter.py --listen 127.0.0.1:50051
"""

from __future__ import annotations

import argparse

from milter_policy import Context, Policy

SENDER_MAP = {
    "<app@internal.example.org>": "<bounces@example.org>",
    "<cron@build.example.org>": "<bounces@example.org>",
}
SENDER_ARGS = ["RET=HDRS"]
ARCHIVE = "<archive@example.org>"
ARCHIVE_ARGS = ["NOTIFY=NEVER"]
DROP_MAILBOXES = frozenset({"noreply", "no-reply"})

policy = Policy("envelope-rewriter")


def mailbox(address: str) -> str:
    """The lower-cased local part: ``<NoReply@example.com>`` -> ``noreply``."""
    return address.strip("<> ").rpartition("@")[0].lower()


# headers=False: only the envelope is needed. The actions are exactly the
# modifications made below (add_recipient_with_args: a recipient with ESMTP
# arguments).
@policy.end_of_message(
    headers=False,
    actions=["change_sender", "add_recipient_with_args", "delete_recipient"],
)
def rewrite(ctx: Context) -> None:
    envelope = ctx.envelope
    new_sender = SENDER_MAP.get(envelope.sender.lower())
    if new_sender is not None:
        ctx.set_sender(new_sender, args=SENDER_ARGS)
    if ARCHIVE.lower() not in (r.lower() for r in envelope.recipients):
        ctx.add_recipient(ARCHIVE, args=ARCHIVE_ARGS)
    for recipient in envelope.recipients:
        if mailbox(recipient) in DROP_MAILBOXES:
            # Given exactly as the MTA sent it, so the MTA finds it.
            ctx.delete_recipient(recipient)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="[::]:50051", help="gRPC address to serve on")
    args = parser.parse_args(argv)
    policy.serve(args.listen)


if __name__ == "__main__":
    main()
