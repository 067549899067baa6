"""Append a disclaimer to the body of every plain-text message.

The body is buffered by the bridge and handed over at end of message
(``ctx.body``, lines ending in CRLF); the handler replaces it with the
original plus ``DISCLAIMER``. Messages it cannot safely append to are left
alone: non-text or multipart ones, base64 or quoted-printable encoded ones,
and ones longer than ``BODY_LIMIT`` (``ctx.body`` would hold only their
start, and replacing the body with it would cut the message).

    python examples/disclaimer.py --listen 127.0.0.1:50051
"""

from __future__ import annotations

import argparse

from milter_policy import Context, Policy

DISCLAIMER = (
    b"\r\n"
    b"-- \r\n"
    b"This message may contain confidential information. If you are not\r\n"
    b"the intended recipient, please tell the sender and delete it.\r\n"
)

BODY_LIMIT = 1 << 20  # 1 MiB

policy = Policy("disclaimer")


def is_plain_text(ctx: Context) -> bool:
    """text/plain (also when there is no Content-Type) in 7bit or 8bit encoding."""
    content_type = b"".join(ctx.header("Content-Type")).strip().lower() or b"text/plain"
    encoding = b"".join(ctx.header("Content-Transfer-Encoding")).strip().lower() or b"7bit"
    return content_type.startswith(b"text/plain") and encoding in (b"7bit", b"8bit")


@policy.end_of_message(envelope=False, body=BODY_LIMIT, actions=["replace_body"])
def append_disclaimer(ctx: Context) -> None:
    if ctx.body_truncated or not is_plain_text(ctx):
        return  # no verdict: the message goes on unchanged
    body = ctx.body
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # the last line had no line end
    ctx.replace_body(body + DISCLAIMER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="[::]:50051", help="gRPC address to serve on")
    args = parser.parse_args(argv)
    policy.serve(args.listen)


if __name__ == "__main__":
    main()
