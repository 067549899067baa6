"""The bridge's long-lived shared streams (``--policy-streams``).

A fixed number of slots, each holding one stream. A new SMTP session goes to
the replica that carries the fewest sessions (as the replicas named themselves
in each stream's initial metadata; a stream not yet answered counts as a
replica of its own), among those to the one given the fewest so far (so that
sessions one at a time spread too), and there to its least busy stream; a
replayed session avoids the replica it came from while another is there.

A stream stops taking new sessions (it is retired, and a new stream takes its
slot) when it broke, when the policy says it is draining (shutting down), and
after ``lifetime`` seconds: gRPC's round_robin places each new stream on a
replica that is up now, so sessions follow replicas added since (with
``dns:///``, those the name resolves to after a policy's max_connection_age
made gRPC resolve it again). A retired stream is half-closed once its last
session ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from milter_bridge.upstream.security import Metadata
from milter_bridge.upstream.shared import SessionsMethod, SharedSession, SharedStream
from milter_bridge.upstream.stream import Tick, no_tick

STREAM_LIFETIME = 30.0
MAX_REPLICAS_COUNTED = 1024


class SharedStreams:
    def __init__(  # noqa: PLR0917 - the streams' collaborators
        self,
        method: SessionsMethod,
        size: int,
        metadata: Callable[[], Metadata],
        on_replica: Callable[[str], object] | None = None,
        on_sessions: Callable[[str, int], object] | None = None,
        lifetime: float = STREAM_LIFETIME,
    ) -> None:
        self._method = method
        self._metadata = metadata
        self._on_replica = on_replica
        self._on_sessions = on_sessions
        self._lifetime = lifetime
        self._streams: list[SharedStream | None] = [None] * size
        self._retired: set[SharedStream] = set()
        self._given: dict[str, int] = {}  # sessions given to each replica so far
        self.opened = 0  # streams opened in all

    def open_session(
        self, avoid: str | None = None, tick: Tick = no_tick, tick_every: float = 1.0
    ) -> SharedSession:
        """A session on the best stream; ``avoid``: a replica a replayed session left;
        ``tick`` is called every ``tick_every`` seconds while the session waits."""
        streams = self._usable()
        load: dict[object, int] = {}
        for stream in (*streams, *self._retired):
            load[stream.replica or stream] = load.get(stream.replica or stream, 0) + stream.sessions
        elsewhere = [s for s in streams if avoid is None or s.replica != avoid] or streams
        given = self._given
        best = min(
            elsewhere,
            key=lambda s: (load[s.replica or s], given.get(s.replica or "", 0), s.sessions),
        )
        if best.replica is not None:
            if len(given) > MAX_REPLICAS_COUNTED:  # replicas come and go over months
                given.clear()
            given[best.replica] = given.get(best.replica, 0) + 1
        return best.open_session(tick, tick_every)

    def _usable(self) -> list[SharedStream]:
        now = asyncio.get_running_loop().time()
        streams: list[SharedStream] = []
        for i, stream in enumerate(self._streams):
            if stream is None or stream.retired or now - stream.opened_at >= self._lifetime:
                if stream is not None:
                    self._retire(stream)
                stream = self._streams[i] = SharedStream(  # noqa: PLW2901
                    self._method, self._metadata(), self._on_replica, self._on_sessions
                )
                self.opened += 1
            streams.append(stream)
        return streams

    def _retire(self, stream: SharedStream) -> None:
        if stream.broken is not None:
            return
        self._retired.add(stream)
        stream.retire(lambda: self._retired.discard(stream))

    async def close(self) -> None:
        """At shutdown, once no session is left."""
        streams = [s for s in (*self._streams, *self._retired) if s is not None]
        await asyncio.gather(*(s.close() for s in streams if s.broken is None))
