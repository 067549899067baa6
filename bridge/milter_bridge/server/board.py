"""What the workers of one bridge share: open connections and readiness, one slot each.

A file the supervisor creates and every worker maps (MAP_SHARED), so all
see the same bytes. Each worker writes only its own slot; ``--max-connections`` counts the
slots of all workers under a POSIX record lock on the same file (``lockf``),
which the kernel releases when its holder dies, so a worker killed at any
moment cannot leave the others locked out. The supervisor clears a dead
worker's slot before its successor starts.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

_SLOT = struct.Struct("=qd")  # open connections, ready until (time.monotonic(); 0: not ready)
_READY = struct.Struct("=d")
READY_FOR = 2.0  # seconds a worker's "ready" holds unless it says so again


class Board:
    def __init__(self, fd: int, workers: int) -> None:
        self.workers = workers
        self._fd = fd
        self._map = mmap.mmap(fd, _SLOT.size * workers)

    @classmethod
    def create(cls, path: Path, workers: int) -> Board:
        """The supervisor's: every slot empty."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, _SLOT.size * workers)
        return cls(fd, workers)

    @classmethod
    def attach(cls, path: Path, workers: int) -> Board:
        """A worker's: the supervisor's board, as it is."""
        return cls(os.open(path, os.O_RDWR), workers)

    def _slot(self, index: int) -> tuple[int, float]:
        opened, ready = _SLOT.unpack_from(self._map, index * _SLOT.size)
        return int(opened), float(ready)

    def _write(self, index: int, opened: int, ready: float) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, opened, ready)

    def open_connections(self) -> int:
        return sum(self._slot(i)[0] for i in range(self.workers))

    def take(self, index: int, limit: int) -> int:
        """One more connection for worker ``index`` if the bridge has fewer than ``limit``
        open; returns the bridge's open connections before (≥ limit: refused)."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            total = self.open_connections()
            if total < limit:
                opened, ready = self._slot(index)
                self._write(index, opened + 1, ready)
            return total
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def give_back(self, index: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            opened, ready = self._slot(index)
            self._write(index, max(opened - 1, 0), ready)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def set_ready(self, index: int, *, ready: bool) -> None:
        """Said every READY_INTERVAL by the worker: a worker whose loop hangs stops
        being ready READY_FOR seconds later. CLOCK_MONOTONIC is one clock for every
        process of the host. A single 8-byte aligned store: readers see the old or
        the new value."""
        until = time.monotonic() + READY_FOR if ready else 0.0
        _READY.pack_into(self._map, index * _SLOT.size + 8, until)

    def ready(self, index: int) -> bool:
        return self._slot(index)[1] > time.monotonic()

    def clear(self, index: int) -> None:
        """The slot of a worker that is gone (its connections died with it)."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            self._write(index, 0, 0.0)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
