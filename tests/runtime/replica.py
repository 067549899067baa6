"""A policy replica in a process of its own, to be killed: ``python -m tests.runtime.replica``.

It prints its port once it serves (the parent's readiness barrier) and answers
every request that expects a reply with a continue verdict; its streams never
end by themselves. SIGTERM stops it gracefully (``server.stop(30)``): no new
streams, those in flight go on.
"""

from __future__ import annotations

import asyncio
import signal

import grpc.aio

from milter_bridge.v1 import policy_pb2_grpc
from tests.runtime.policy import ScriptedPolicy
from tests.session import harness as h


async def main() -> None:
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(
        ScriptedPolicy(h.capabilities(connect=h.DECIDE)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)  # the parent reads it
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(30)


if __name__ == "__main__":
    asyncio.run(main())
