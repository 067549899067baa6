"""Write milter-bridge policy services in Python.

    from milter_policy import Context, Policy

    policy = Policy("stamper")

    @policy.end_of_message
    def stamp(ctx: Context) -> None:
        ctx.add_header("X-Stamped", "yes")

    policy.serve("[::]:50051")

Handlers per event (see ``Policy``), a ``Context`` per connection with what is
known and the actions, capabilities derived from the handlers, ``serve()``
with gRPC health and reflection, and ``milter_policy.testing`` to run a
policy through a conversation without a bridge or an MTA.
"""

from milter_policy.context import Client, Context, Envelope, PolicyUsageError
from milter_policy.policy import EVENTS, Policy
from milter_policy.security import ServerTls
from milter_policy.server import PolicyServer

__all__ = [
    "EVENTS",
    "Client",
    "Context",
    "Envelope",
    "Policy",
    "PolicyServer",
    "PolicyUsageError",
    "ServerTls",
]
