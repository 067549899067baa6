"""The bridge's long-lived shared streams (``--policy-streams``): each new SMTP session
goes to the stream that carries the fewest; a stream that broke is replaced by a new one
when the next session needs it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from milter_bridge.upstream.security import Metadata
from milter_bridge.upstream.shared import SessionsMethod, SharedSession, SharedStream


class SharedStreams:
    def __init__(
        self,
        method: SessionsMethod,
        size: int,
        metadata: Callable[[], Metadata],
        on_replica: Callable[[str], object] | None = None,
    ) -> None:
        self._method = method
        self._metadata = metadata
        self._on_replica = on_replica
        self._streams: list[SharedStream | None] = [None] * size
        self.opened = 0  # streams opened in all

    def open_session(self) -> SharedSession:
        return self._least_busy().open_session(self._move)

    def _move(self, session: SharedSession) -> SharedStream | None:  # noqa: ARG002
        """A stream for a session whose stream broke (a new one in the broken one's place)."""
        return self._least_busy()

    def _least_busy(self) -> SharedStream:
        best: SharedStream | None = None
        for i, stream in enumerate(self._streams):
            if stream is None or stream.broken is not None:
                stream = self._streams[i] = SharedStream(  # noqa: PLW2901
                    self._method, self._metadata(), self._on_replica
                )
                self.opened += 1
            if best is None or stream.sessions < best.sessions:
                best = stream
        assert best is not None
        return best

    async def close(self) -> None:
        """At shutdown, once no session is left."""
        streams = [s for s in self._streams if s is not None and s.broken is None]
        await asyncio.gather(*(s.close() for s in streams))
