"""How a Process stream's end is read: one table, one function (no I/O).

``classify(code, details, replied=...)`` turns the status a stream ended with
into the failure cause counted in ``failure_actions_total{cause}``, whether
the stream may be reopened and what was sent on it replayed, and whether the
policy's capabilities are fetched again at once. ``code`` is the status gRPC
Core delivered (``first_status.StatusRecord``), never the one grpc.aio may
put over it (see the INTERNAL row); ``replied``: a reply of this stream was
already used.

===================  ==============================================  ==============  =====  =======
status               circumstance (details seen, grpcio 1.85)        cause           retry  refresh
===================  ==============================================  ==============  =====  =======
UNAVAILABLE          the replica went away or could not be reached,  unreachable     yes    no
                     before any reply was used: its server stopped
                     (``Cancelling all calls``: GOAWAY, then its
                     calls cancelled), its process killed (``Stream
                     removed (Socket closed)``, ``Stream removed
                     (recvmsg:Connection reset by peer (104))``,
                     ``Stream removed (sendmsg: Broken pipe
                     (32))``), its connection aged out past the
                     grace (``max connection age``), or the policy
                     ended the stream with UNAVAILABLE itself
UNAVAILABLE          the same, after a reply was used (the session   unreachable     no     no
                     acted on it: a replay cannot undo that)
CANCELLED            details exactly ``CANCELLED``: the replica's    unreachable     yes    no
                     server shut down gracefully (SIGTERM, a
                     rolling update) and Core cancelled the calls
                     it had received but not yet handed to the
                     policy's handler; before any reply was used
CANCELLED            the same, after a reply was used                unreachable     no     no
FAILED_PRECONDITION  the policy refused the stream: its              refused_stream  no     yes
                     capabilities changed (policy.proto)
DEADLINE_EXCEEDED    a gRPC deadline passed (the bridge sets none    timeout         no     no
                     on Process: a proxy's, or the policy's own)
INTERNAL             details exactly ``Internal error from Core``:   stream_error    no     yes
                     grpc.aio's stand-in, not the policy's; the
                     real status was lost (below)
OK                   the policy ended the stream (its handler        stream_error    no     no
                     returned) while an answer was owed
none (``None``)      no status: the bridge cancelled the call        stream_error    no     no
any other            the policy ended the stream with an error:      stream_error    no     no
                     UNKNOWN (``Unexpected <class '…'>: …``: its
                     handler raised), INTERNAL with the policy's
                     own details, CANCELLED with other details,
                     RESOURCE_EXHAUSTED, UNIMPLEMENTED,
                     UNAUTHENTICATED, …
===================  ==============================================  ==============  =====  =======

Evidence (``tests/runtime/test_grpc_statuses.py``, real grpc.aio servers on
port 0). A server stopped with a grace period while streams arrive: those it
had not yet handed to a handler end with ``CANCELLED: CANCELLED`` (measured:
449 of 4200 streams opened around 20 graceful stops; the others were answered,
or refused with UNAVAILABLE). The fault matrix's rolling update found it: two
sessions in 600 got the failure action before this row. A replica that dies
mid-stream, by ``server.stop(0)``, SIGKILL of its process or max connection
age: Core delivers UNAVAILABLE with the details
above, every time. ``INTERNAL: Internal error from Core`` is not a status a
policy or a dying replica sends: grpc.aio sets it when a ``write()`` fails
because Core has already ended the call, and it replaces whatever status
Core delivered (grpc#36066; fix proposed in grpc#43486). A client writing
while its server ended the stream saw it, instead of the server's status, in
most streams for every way of ending measured: UNAVAILABLE (server stopped,
process killed), FAILED_PRECONDITION, OK, UNKNOWN, INTERNAL, CANCELLED,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; the first status recorded on the call
was the server's in all of them. So it names no cause: it is classified as
an error, not retried (it may hide a refusal or a policy bug as well as a
replica gone), and the capabilities are fetched again (one Describe call; the
likeliest status it hides is a refusal, which ends a stream at its ``start``
while the bridge writes the first event).

``retry`` says only what the status allows: the stream also needs what it
sent to be still held for a replay, an attempt left, and time before the
deadline (``stream.PolicyStream``).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

# What grpc.aio records over a call's status when a write fails (grpc#36066).
INTERNAL_ERROR_FROM_CORE = "Internal error from Core"
# Core's own details on the calls a gracefully stopping server had not handled yet.
CANCELLED_BY_SHUTDOWN = "CANCELLED"


@dataclass(frozen=True)
class Classification:
    """What a stream's end means to the bridge."""

    cause: str  # a metrics.CAUSES label
    retry: bool  # the stream may be reopened and what was sent on it replayed
    refresh_capabilities: bool  # Describe is called again at once


_UNREACHABLE_BEFORE_A_REPLY = Classification("unreachable", retry=True, refresh_capabilities=False)
_UNREACHABLE = Classification("unreachable", retry=False, refresh_capabilities=False)
_REFUSED = Classification("refused_stream", retry=False, refresh_capabilities=True)
_TIMEOUT = Classification("timeout", retry=False, refresh_capabilities=False)
_STATUS_LOST = Classification("stream_error", retry=False, refresh_capabilities=True)
_ERROR = Classification("stream_error", retry=False, refresh_capabilities=False)


def classify(code: grpc.StatusCode | None, details: str, *, replied: bool) -> Classification:
    """The meaning of a stream that ended with ``code`` and ``details`` (the module's table)."""
    if code is grpc.StatusCode.UNAVAILABLE or (
        code is grpc.StatusCode.CANCELLED and details == CANCELLED_BY_SHUTDOWN
    ):
        return _UNREACHABLE if replied else _UNREACHABLE_BEFORE_A_REPLY
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return _REFUSED
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return _TIMEOUT
    if code is grpc.StatusCode.INTERNAL and details == INTERNAL_ERROR_FROM_CORE:
        return _STATUS_LOST
    return _ERROR
