"""The status a gRPC call ended with as Core delivered it, whatever grpc.aio says later.

When a policy ends a stream while the bridge writes to it (a refusal at
``start`` while the first event is written, a replica dying while events
stream), Core fails that write; grpc.aio's ``write()`` then records
``INTERNAL: Internal error from Core`` over the status Core had delivered
(grpc#36066; fix proposed in grpc#43486, grpcio 1.85 has the bug). A
``read()`` that raises after that, and ``code()``, report INTERNAL: the
policy's FAILED_PRECONDITION, UNAVAILABLE or OK is gone from the call.

The first status grpc.aio records is Core's, and it runs the call's done
callbacks then, once: ``StatusRecord`` registers one before anything is
written and keeps that status (``tests/runtime/test_grpc_statuses.py``).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio

T = TypeVar("T")


def _settled(coroutine: Coroutine[Any, Any, T]) -> T | None:
    """The result of a coroutine that ends without waiting (a done call's status), else None."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coroutine.close()
    return None


class StatusRecord:
    """The first status of one call; make it right after the call, before the first write."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        call.add_done_callback(self._record)

    def _record(self, call: grpc.aio.Call) -> None:
        if self.code is not None:
            return  # only the first status is Core's
        # The call is done: code() and details() return without waiting.
        code = _settled(call.code())
        if code is not None:
            self.code = code
            self.details = _settled(call.details()) or ""

    def of(self, error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
        """The status to believe for a call that raised ``error``: the first one recorded."""
        if self.code is None:
            return error.code(), error.details() or ""
        return self.code, self.details
