"""Every row of milter_bridge.upstream.status's table, and the table's labels are the metric's."""

from __future__ import annotations

import grpc
import pytest

from milter_bridge.metrics import CAUSES
from milter_bridge.upstream.status import (
    CANCELLED_BY_SHUTDOWN,
    INTERNAL_ERROR_FROM_CORE,
    Classification,
    classify,
)

S = grpc.StatusCode


def c(cause: str, *, retry: bool = False, refresh: bool = False) -> Classification:
    return Classification(cause, retry=retry, refresh_capabilities=refresh)


@pytest.mark.parametrize(
    ("code", "details", "replied", "expected"),
    [
        # The replica went away: the details vary with how (measured, test_grpc_statuses).
        (S.UNAVAILABLE, "Cancelling all calls", False, c("unreachable", retry=True)),
        (S.UNAVAILABLE, "Stream removed (Socket closed)", False, c("unreachable", retry=True)),
        (
            S.UNAVAILABLE,
            "Stream removed (recvmsg:Connection reset by peer (104))",
            False,
            c("unreachable", retry=True),
        ),
        (S.UNAVAILABLE, "max connection age", False, c("unreachable", retry=True)),
        (S.UNAVAILABLE, "replica going away", False, c("unreachable", retry=True)),
        (S.UNAVAILABLE, "Cancelling all calls", True, c("unreachable")),
        (S.FAILED_PRECONDITION, "capabilities changed", False, c("refused_stream", refresh=True)),
        (S.FAILED_PRECONDITION, "capabilities changed", True, c("refused_stream", refresh=True)),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded", False, c("timeout")),
        # grpc.aio's stand-in for a status it lost: no retry, capabilities fetched again.
        (S.INTERNAL, INTERNAL_ERROR_FROM_CORE, False, c("stream_error", refresh=True)),
        (S.INTERNAL, INTERNAL_ERROR_FROM_CORE, True, c("stream_error", refresh=True)),
        # The policy's own INTERNAL is an error like any other.
        (S.INTERNAL, "policy bug", False, c("stream_error")),
        (S.OK, "", False, c("stream_error")),
        (None, "", False, c("stream_error")),
        (S.UNKNOWN, "Unexpected <class 'RuntimeError'>: boom", False, c("stream_error")),
        (S.CANCELLED, "policy says so", False, c("stream_error")),
        # A replica's graceful stop cancels the calls it had not handled yet.
        (S.CANCELLED, CANCELLED_BY_SHUTDOWN, False, c("unreachable", retry=True)),
        (S.CANCELLED, CANCELLED_BY_SHUTDOWN, True, c("unreachable")),
        (S.RESOURCE_EXHAUSTED, "", False, c("stream_error")),
        (S.UNIMPLEMENTED, "Method not found!", False, c("stream_error")),
        (S.UNAUTHENTICATED, "", False, c("stream_error")),
    ],
)
def test_classify(
    code: grpc.StatusCode | None, details: str, replied: bool, expected: Classification
) -> None:
    assert classify(code, details, replied=replied) == expected


@pytest.mark.parametrize("code", [*grpc.StatusCode, None])
@pytest.mark.parametrize("replied", [False, True])
def test_every_status_has_a_known_cause_and_only_a_replica_gone_is_retried(
    code: grpc.StatusCode | None, replied: bool
) -> None:
    for details in ("", INTERNAL_ERROR_FROM_CORE, CANCELLED_BY_SHUTDOWN):
        ended = classify(code, details, replied=replied)
        assert ended.cause in CAUSES
        gone = code is S.UNAVAILABLE or (code is S.CANCELLED and details == CANCELLED_BY_SHUTDOWN)
        assert ended.retry == (gone and not replied)
