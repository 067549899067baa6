"""What a session sent on a shared stream, kept so that another stream can take over.

Only for a policy on shared streams (``SharedPolicyService``, which documents
replays): when the stream breaks because its replica went away, the session's
conversation is sent again on a new stream, ``start.attempt`` counting up. Kept:
the session's own events (connect, helo, unknown) and the current message's;
a finished or aborted message is dropped, so a long SMTP session stays small.
An event the policy already answered is replayed as observed, with ``decided``
set to the verdict the bridge carried out: the policy rebuilds its state and
decides nothing twice. At most ``limit`` bytes are kept; a conversation that
needs more cannot be replayed until its message is over.
"""

from __future__ import annotations

from dataclasses import dataclass

from milter_bridge.session.stages import Stage
from milter_bridge.v1 import policy_pb2 as pb

JOURNAL_LIMIT = 1 << 20
# Replays of one conversation: a message that kills every replica it reaches must
# not walk through all of them (at most three streams in all, as OPEN_ATTEMPTS).
MAX_REPLAYS = 2


@dataclass(slots=True)
class _Entry:
    request: pb.ProcessRequest
    stage: Stage
    in_message: bool
    decided: pb.Verdict | None = None


def with_attempt(start: pb.ProcessRequest, attempt: int) -> pb.ProcessRequest:
    """A copy of a `start` request with ``attempt`` (a Process stream reopened, or a
    conversation replayed on a shared stream)."""
    copy = pb.ProcessRequest()
    copy.CopyFrom(start)
    copy.start.attempt = attempt
    return copy


class Journal:
    def __init__(self, start: pb.ProcessRequest, limit: int = JOURNAL_LIMIT) -> None:
        self._start = start
        self._limit = limit
        self._entries: list[_Entry] = []
        self._last: _Entry | None = None
        self._session_bytes = 0  # of the session's own requests (connect, helo, unknown)
        self._message_bytes = 0  # of the current message's, kept or not
        self._lost = False  # a request of the session itself was not kept: no replay

    @property
    def complete(self) -> bool:
        """Everything a replay needs is kept (within the limit)."""
        return self._session_bytes + self._message_bytes <= self._limit and not self._lost

    def add(self, request: pb.ProcessRequest, stage: Stage, *, in_message: bool) -> None:
        # A message past the limit keeps nothing more (no replay until it ends), but its
        # bytes are still counted so that it stays off. The session's own requests are
        # kept while they alone fit: one past it turns replays off for the session.
        size = request.ByteSize()
        entry = _Entry(request, stage, in_message)
        if in_message:
            self._message_bytes += size
            keep = self.complete
        else:
            self._session_bytes += size
            keep = self._session_bytes <= self._limit
            self._lost = self._lost or not keep
        self._last = entry if keep else None
        if keep:
            self._entries.append(entry)

    def decided(self, verdict: pb.Verdict) -> None:
        """The last request added (the one that awaited an answer) got this verdict."""
        if self._last is not None:
            self._last.decided = verdict

    def message_over(self) -> None:
        if self._message_bytes:
            self._entries = [e for e in self._entries if not e.in_message]
            self._message_bytes = 0
        self._last = None

    def replay(self, attempt: int) -> list[tuple[pb.ProcessRequest, Stage]]:
        """The conversation again, for a new stream: `start` with ``attempt``, then each
        kept request in order, the answered ones as observed with ``decided``."""
        out: list[tuple[pb.ProcessRequest, Stage]] = [
            (with_attempt(self._start, attempt), Stage.CONNECT)
        ]
        for entry in self._entries:
            request = entry.request
            if entry.decided is not None:
                request = pb.ProcessRequest()
                request.CopyFrom(entry.request)
                request.reply_expected = False
                request.decided.CopyFrom(entry.decided)
            out.append((request, entry.stage))
        return out
