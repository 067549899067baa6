"""Mutations of an MTA's side of a milter session, for the black-box fuzzer (fuzz/blackbox.py).

A session is a list of whole packets (``uint32 length | command byte | payload``,
the length counting the command byte and the payload), as the captures in
tests/fixtures/captured hold them. Packet mutations keep the list, so that
several can be stacked; byte mutations work on the joined stream and come last
(after one, the packet boundaries are gone). Every mutation takes its choices
from the ``random.Random`` it is given and from nothing else.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence

from milter_bridge.protocol.codec import DEFAULT_MAX_PACKET_SIZE
from milter_bridge.protocol.commands import COMMAND_PARSERS

Packets = list[bytes]
PacketMutation = Callable[[random.Random, Packets, Sequence[Packets]], Packets]
ByteMutation = Callable[[random.Random, bytes], bytes]

_LEN = struct.Struct("!I")
KNOWN_COMMANDS = sorted(COMMAND_PARSERS)
UNKNOWN_COMMANDS = [bytes([b]) for b in range(256) if bytes([b]) not in COMMAND_PARSERS]
# Length prefixes no packet may have: the decoder must refuse them from the 4 bytes
# alone, before it waits for (or buffers) a payload of that size.
HUGE_LENGTHS = (0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, DEFAULT_MAX_PACKET_SIZE + 1)
# A mutated input stays below this (repeats and duplicates of 64 KiB body chunks).
MAX_INPUT = 1 << 20


def _with_payload(rng: random.Random, packets: Packets) -> int | None:
    """A random packet with a payload (not only a command byte); None when there is none."""
    fit = [i for i, p in enumerate(packets) if len(p) > 5]
    return rng.choice(fit) if fit else None


def _any(rng: random.Random, packets: Packets) -> int:
    """Any packet (the list is never empty here)."""
    return rng.randrange(len(packets))


def _with_length(packet: bytes, length: int) -> bytes:
    return _LEN.pack(length) + packet[4:]


def _with_code(packet: bytes, code: bytes) -> bytes:
    return packet[:4] + code + packet[5:]


def length_smaller(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet claims fewer bytes than it has: the rest is read as the next packet."""
    i = _with_payload(rng, packets)
    if i is not None:
        packets[i] = _with_length(packets[i], rng.randint(1, len(packets[i]) - 5))
    return packets


def length_larger(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet claims more bytes than it has, up to just past the packet limit:
    the following packets are swallowed, or the bridge waits for bytes that never come."""
    i = _any(rng, packets)
    real = len(packets[i]) - 4
    length = rng.choice(
        (
            real + 1,
            real + rng.randint(2, 1 << 16),
            DEFAULT_MAX_PACKET_SIZE,
            DEFAULT_MAX_PACKET_SIZE + 1,
        )
    )
    packets[i] = _with_length(packets[i], length)
    return packets


def length_huge(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet's length is far beyond any limit (0x7fffffff and its neighbours)."""
    i = _any(rng, packets)
    packets[i] = _with_length(packets[i], rng.choice(HUGE_LENGTHS))
    return packets


def length_zero(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet's length is 0: a packet without even a command byte."""
    i = _any(rng, packets)
    packets[i] = _with_length(packets[i], 0)
    return packets


def unknown_command(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet's command byte is one the protocol does not define."""
    i = _any(rng, packets)
    packets[i] = _with_code(packets[i], rng.choice(UNKNOWN_COMMANDS))
    return packets


def other_command(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet's command byte is another real command's: its payload has the wrong layout."""
    i = _any(rng, packets)
    code = packets[i][4:5]
    packets[i] = _with_code(packets[i], rng.choice([c for c in KNOWN_COMMANDS if c != code]))
    return packets


def payload_cut(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet's payload cut short, its length fixed to match: well framed, but a
    string loses its NUL or a number its bytes."""
    i = _with_payload(rng, packets)
    if i is not None:
        cut = packets[i][5 : rng.randint(5, len(packets[i]) - 1)]
        packets[i] = _LEN.pack(len(cut) + 1) + packets[i][4:5] + cut
    return packets


def payload_flip(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """Bits flipped inside one packet's payload only: the framing stays intact."""
    i = _with_payload(rng, packets)
    if i is not None:
        packets[i] = packets[i][:5] + bit_flip(rng, packets[i][5:])
    return packets


def drop(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet left out (a missing OPTNEG, CONNECT, MAIL, end of headers, ...)."""
    del packets[_any(rng, packets)]
    return packets


def duplicate(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet sent twice, right after itself or somewhere else."""
    i = _any(rng, packets)
    packets.insert(rng.choice((i, rng.randint(0, len(packets)))), packets[i])
    return packets


def repeat(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet many times over: more commands than the bridge queues, headers and
    recipients past its limits."""
    i = _any(rng, packets)
    times = min(rng.randint(2, 300), max(1, MAX_INPUT // len(packets[i])))
    packets[i : i + 1] = [packets[i]] * times
    return packets


def swap(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """Two packets change places (e.g. end of message before the body)."""
    if len(packets) > 1:
        i, j = rng.sample(range(len(packets)), 2)
        packets[i], packets[j] = packets[j], packets[i]
    return packets


def move(rng: random.Random, packets: Packets, _others: Sequence[Packets]) -> Packets:
    """One packet moved elsewhere: a command out of order."""
    packet = packets.pop(_any(rng, packets))
    packets.insert(rng.randint(0, len(packets)), packet)
    return packets


def splice(rng: random.Random, packets: Packets, others: Sequence[Packets]) -> Packets:
    """The start of this session, then the rest of another (two MTAs' dialects meet)."""
    other = rng.choice(others)
    return packets[: rng.randint(0, len(packets))] + other[rng.randint(0, len(other)) :]


def bit_flip(rng: random.Random, data: bytes) -> bytes:
    """1 to 8 bits flipped anywhere: length prefixes, command bytes, payloads."""
    if not data:
        return data
    out = bytearray(data)
    for bit in rng.sample(range(8 * len(out)), min(rng.randint(1, 8), 8 * len(out))):
        out[bit // 8] ^= 1 << bit % 8
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    """The stream cut at any byte: inside a length prefix, a command, a payload."""
    return data[: rng.randint(0, len(data))]


def garbage(rng: random.Random, data: bytes) -> bytes:
    """Random bytes put in at any offset, or (one time in eight) instead of everything."""
    if rng.randrange(8) == 0:
        return rng.randbytes(rng.randint(0, 4096))
    at = rng.randint(0, len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 512)) + data[at:]


PACKET_MUTATIONS: dict[str, PacketMutation] = {
    f.__name__: f
    for f in (
        length_smaller,
        length_larger,
        length_huge,
        length_zero,
        unknown_command,
        other_command,
        payload_cut,
        payload_flip,
        drop,
        duplicate,
        repeat,
        swap,
        move,
        splice,
    )
}
BYTE_MUTATIONS: dict[str, ByteMutation] = {f.__name__: f for f in (bit_flip, truncate, garbage)}
KINDS = (*PACKET_MUTATIONS, *BYTE_MUTATIONS)


def apply(
    rng: random.Random, kinds: Sequence[str], packets: Packets, others: Sequence[Packets]
) -> bytes:
    """``kinds`` applied to a copy of ``packets``: the packet mutations in the order given,
    then the byte mutations on the joined stream."""
    out = list(packets)
    for kind in kinds:
        if kind in PACKET_MUTATIONS and out:
            out = PACKET_MUTATIONS[kind](rng, out, others)
    data = b"".join(out)
    for kind in kinds:
        if kind in BYTE_MUTATIONS:
            data = BYTE_MUTATIONS[kind](rng, data)
    return data[:MAX_INPUT]
