"""The black-box fuzzer's inputs: input INDEX of seed SEED is always the same bytes, cut
into the same writes (``make_input``), so that any one of them can be replayed.

The material is the MTA's side of every captured session (tests/fixtures/captured:
real Postfix, Sendmail and miltertest), sorted by file name: a different set of
captures gives different inputs for the same seed and index.
"""

from __future__ import annotations

import functools
import random
import struct
from dataclasses import dataclass

from fuzz.mutate import KINDS, Packets, apply
from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE
from tests.captured import all_captures

# One input in this many is a capture as it is: the bridge must still serve it.
UNMUTATED = 20
# How many mutations an input stacks: mostly one, so that each kind is seen alone.
STACKED = (1, 1, 1, 2, 2, 3)
# Pauses between writes of a paced input, in seconds: enough for the bridge to read
# and answer part of a session before the rest arrives.
PAUSES = (0.0, 0.0, 0.0005, 0.002, 0.005)
BYTE_AT_A_TIME = 512  # inputs up to this size may be written one byte per write
_LEN = struct.Struct("!I")


@functools.cache
def sessions() -> tuple[tuple[str, Packets], ...]:
    """(capture name, the MTA's packets) for every capture."""
    return tuple((c.name, [p.frame for p in c.packets if p.from_mta]) for c in all_captures())


@dataclass(frozen=True, slots=True)
class FuzzInput:
    seed: int
    index: int
    base: str  # the capture it was made from
    kinds: tuple[str, ...]  # the mutations applied; () for a capture as it is
    data: bytes
    ends: tuple[int, ...]  # offset where each write ends; the last is len(data)
    pauses: tuple[float, ...]  # seconds to wait after each write
    # Written packet by packet, each command an MTA waits on followed by a wait for the
    # bridge's reply, as an MTA does: so that a session gets past the first answer the
    # policy must give (unpaced, an MTA that sends everything at once is cut off after
    # 16 commands queued behind an answer).
    lockstep: bool = False

    @property
    def name(self) -> str:
        """SEED:INDEX, or for a kept input (index -1) its file's name."""
        return self.base if self.index < 0 else f"{self.seed}:{self.index}"

    def writes(self) -> list[tuple[bytes, float]]:
        """The writes in order, each with the pause after it."""
        starts = (0, *self.ends[:-1])
        return [(self.data[a:b], p) for a, b, p in zip(starts, self.ends, self.pauses, strict=True)]


def packet_ends(data: bytes) -> tuple[int, ...]:
    """Where each packet ends, by the length prefixes as the bridge reads them; from a
    length it refuses (0, above its default limit) or one past the end, the rest is one."""
    ends = []
    pos = 0
    while pos + 4 <= len(data):
        (length,) = _LEN.unpack_from(data, pos)
        if not 0 < length <= DEFAULT_MAX_PACKET_SIZE or pos + 4 + length > len(data):
            break
        pos += 4 + length
        ends.append(pos)
    return (*ends, len(data)) if pos < len(data) or not ends else tuple(ends)


def _ends(rng: random.Random, data: bytes) -> tuple[tuple[int, ...], bool]:
    """Where writes end, and whether in lockstep: one write, a few random cuts, (small
    inputs) a byte a time, so that the bridge's reads split length prefixes and payloads
    anywhere; or packet by packet."""
    size = len(data)
    how = rng.choice(("one", "cuts", "cuts", "bytes", "packets", "packets"))
    if size == 0 or how == "one":
        return (size,), False
    if how == "packets":
        return packet_ends(data), True
    if how == "bytes" and size <= BYTE_AT_A_TIME:
        return tuple(range(1, size + 1)), False
    count = rng.randint(1, 32 if how == "bytes" else 8)
    return (*sorted({rng.randint(1, size) for _ in range(count)} - {size}), size), False


def make_input(seed: int, index: int) -> FuzzInput:
    # A str seed is hashed with SHA-512 by random.Random: the same in every process,
    # whatever PYTHONHASHSEED. Reproducible on purpose: nothing here is a secret.
    rng = random.Random(f"milter-bridge blackbox {seed}:{index}")  # noqa: S311
    pool = sessions()
    base, packets = rng.choice(pool)
    if rng.randrange(UNMUTATED) == 0:
        kinds: tuple[str, ...] = ()
    else:
        kinds = tuple(rng.choice(KINDS) for _ in range(rng.choice(STACKED)))
    data = apply(rng, kinds, packets, [p for _, p in pool])
    ends, lockstep = _ends(rng, data)
    paced = not lockstep and rng.randrange(3) == 0
    pauses = tuple(rng.choice(PAUSES) if paced else 0.0 for _ in ends)
    return FuzzInput(seed, index, base, kinds, data, ends, pauses, lockstep)
