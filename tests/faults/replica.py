"""A policy replica that decides at RCPT and at end of message, in a process of its own.

    python -m tests.faults.replica ADDRESS [EOM_DELAY]
        ADDRESS: 127.0.0.1:0, 127.0.0.1:PORT or unix:/PATH; EOM_DELAY: seconds the
        end-of-message handler takes (default 0), so that sessions wait there

It prints ``port N`` once it serves (the parent's readiness barrier; 0 on a unix
socket) and serves with the SDK's PolicyServer until SIGTERM or SIGINT, then
stops gracefully as a user's policy does: streams in flight finish, new ones
are refused. The decisions, which the load tool's messages make predictable:
- RCPT: ``rcpt2@…`` is refused with 550 5.1.1; every other recipient continues;
- end of message (with the envelope, headers and body): a Subject with MARKER is
  rejected with 550 5.7.1, every other message gets ``X-Bench: 1`` and continues.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from milter_policy import Context, Policy
from milter_policy.server import PolicyServer

MARKER = b"REJECT"
REFUSED_RECIPIENT = "rcpt2@"
log = logging.getLogger("replica")
GRACE = 20.0  # seconds for streams in flight after SIGTERM


def replica_policy(eom_delay: float = 0.0) -> Policy:
    policy = Policy("fault-replica")

    @policy.rcpt_to
    def check_recipient(ctx: Context, address: str, args: list[str]) -> None:
        if REFUSED_RECIPIENT in address:
            ctx.reject("mailbox unavailable", code=550, xcode="5.1.1")

    # The envelope and the body too: the MTA sends every event of the message (the
    # bridge forwards them as observed), so a message can end at any of them.
    @policy.end_of_message(envelope=True, headers=True, body=True, actions=["add_header"])
    async def decide(ctx: Context) -> None:
        # The mark that this replica took a session (the tests' readiness after a restart).
        log.info("decides %s", ctx.connection_id)
        if eom_delay:
            await asyncio.sleep(eom_delay)
        if any(MARKER in value for value in ctx.header("Subject")):
            ctx.reject("marked", code=550, xcode="5.7.1")
        else:
            ctx.add_header("X-Bench", "1")

    return policy


async def main(address: str, eom_delay: float) -> None:
    server = PolicyServer(replica_policy(eom_delay), address)
    await server.start()
    print(f"port {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping (grace %gs)", GRACE)
    await server.stop(GRACE)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0))
