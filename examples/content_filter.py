"""Reject or quarantine messages by keywords in the Subject or the body.

A keyword from ``REJECT_KEYWORDS`` refuses the message with
``554 5.7.1 message content rejected``; one from ``QUARANTINE_KEYWORDS``
accepts it but holds it (Postfix: hold queue; Sendmail: quarantine) for a
human to look at. Matching is case-insensitive and treats any run of
whitespace (also line breaks and folded header lines) as one space.

The body is searched as it travels, without MIME decoding: a real filter
would decode base64 and quoted-printable parts first.

    python examples/content_filter.py --listen 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from milter_policy import Context, Policy

REJECT_KEYWORDS = ("lottery winner", "wire transfer fee")
QUARANTINE_KEYWORDS = ("password reset", "invoice overdue")

# How much of the body to look at; the rest of a longer message is not searched.
BODY_LIMIT = 256 * 1024

policy = Policy("content-filter")


def normalise(text: bytes) -> bytes:
    """Lower case, whitespace runs as one space: b"A\\r\\n  B" -> b"a b"."""
    return b" ".join(text.lower().split())


def find(keywords: Iterable[str], texts: Iterable[bytes]) -> str | None:
    """The first keyword found in any of the (normalised) texts."""
    for keyword in keywords:
        needle = normalise(keyword.encode())
        if any(needle in text for text in texts):
            return keyword
    return None


# body=BODY_LIMIT: the bridge buffers the body and hands it over at end of
# message in ctx.body; headers (default True) fill ctx.headers. The envelope
# is not needed. The only modification this policy makes is quarantine.
@policy.end_of_message(envelope=False, body=BODY_LIMIT, actions=["quarantine"])
def scan(ctx: Context) -> None:
    texts = [normalise(subject) for subject in ctx.header("Subject")]
    texts.append(normalise(ctx.body))
    if find(REJECT_KEYWORDS, texts) is not None:
        ctx.reject("message content rejected", code=554, xcode="5.7.1")
    elif (keyword := find(QUARANTINE_KEYWORDS, texts)) is not None:
        ctx.quarantine(f"content-filter: {keyword!r}")
    # Otherwise no verdict: the message goes on unchanged.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="[::]:50051", help="gRPC address to serve on")
    args = parser.parse_args(argv)
    policy.serve(args.listen)


if __name__ == "__main__":
    main()
