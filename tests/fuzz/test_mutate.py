"""Each mutation of the black-box fuzzer (fuzz/mutate.py) does what it says, on a real capture."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest

from fuzz import mutate as m
from fuzz.inputs import sessions
from milter_bridge.protocol import (
    CommandDecoder,
    FrameDecoder,
    FrameTooLarge,
    MalformedPacket,
    UnknownCommand,
)

SESSION = dict(sessions())["sendmail-bs"]
OTHER = dict(sessions())["postfix-smtpd-v6-ipv6"]
SEEDS = range(25)


def packets(kind: str, seed: int) -> list[bytes]:
    return m.PACKET_MUTATIONS[kind](random.Random(seed), list(SESSION), [OTHER])


def stream(kind: str, seed: int) -> bytes:
    return m.BYTE_MUTATIONS[kind](random.Random(seed), b"".join(SESSION))


def length(packet: bytes) -> int:
    return int(struct.unpack("!I", packet[:4])[0])


def changed(out: list[bytes]) -> list[int]:
    """Indices of the packets that differ (for mutations that keep the count)."""
    assert len(out) == len(SESSION)
    return [i for i, (a, b) in enumerate(zip(SESSION, out, strict=True)) if a != b]


@pytest.mark.parametrize("seed", SEEDS)
def test_length_smaller_and_larger(seed: int) -> None:
    for kind, wrong in (("length_smaller", int.__lt__), ("length_larger", int.__gt__)):
        out = packets(kind, seed)
        [i] = changed(out)
        assert out[i][4:] == SESSION[i][4:]  # only the length prefix
        assert wrong(length(out[i]), length(SESSION[i]))


@pytest.mark.parametrize("seed", SEEDS)
def test_length_huge_is_refused_from_the_prefix(seed: int) -> None:
    out = packets("length_huge", seed)
    [i] = changed(out)
    assert length(out[i]) in m.HUGE_LENGTHS
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"".join(out))


@pytest.mark.parametrize("seed", SEEDS)
def test_length_zero(seed: int) -> None:
    out = packets("length_zero", seed)
    [i] = changed(out)
    assert length(out[i]) == 0
    with pytest.raises(MalformedPacket, match="length 0"):
        FrameDecoder().feed(b"".join(out))


@pytest.mark.parametrize("seed", SEEDS)
def test_unknown_and_other_command(seed: int) -> None:
    out = packets("unknown_command", seed)
    [i] = changed(out)
    assert out[i][4:5] in m.UNKNOWN_COMMANDS
    with pytest.raises(UnknownCommand):
        CommandDecoder().feed(b"".join(out))
    out = packets("other_command", seed)
    [i] = changed(out)
    assert out[i][4:5] in m.KNOWN_COMMANDS
    assert out[i][4:5] != SESSION[i][4:5]
    assert out[i][:4] + out[i][5:] == SESSION[i][:4] + SESSION[i][5:]


@pytest.mark.parametrize("seed", SEEDS)
def test_payload_cut_and_flip_keep_the_framing(seed: int) -> None:
    for kind in ("payload_cut", "payload_flip"):
        out = packets(kind, seed)
        frames = FrameDecoder().feed(b"".join(out))
        assert len(frames) == len(SESSION)  # every packet still whole
        [i] = changed(out)
        assert out[i][4:5] == SESSION[i][4:5]
        if kind == "payload_cut":
            assert SESSION[i][5:].startswith(out[i][5:])
            assert len(out[i]) < len(SESSION[i])
        else:
            assert len(out[i]) == len(SESSION[i])


@pytest.mark.parametrize("seed", SEEDS)
def test_drop_duplicate_repeat(seed: int) -> None:
    dropped = Counter(SESSION) - Counter(packets("drop", seed))
    assert sum(dropped.values()) == 1
    added = Counter(packets("duplicate", seed)) - Counter(SESSION)
    assert sum(added.values()) == 1
    repeated = packets("repeat", seed)
    added = Counter(repeated) - Counter(SESSION)
    assert len(added) == 1
    assert len(repeated) > len(SESSION)
    assert len(b"".join(repeated)) <= m.MAX_INPUT + len(b"".join(SESSION))


@pytest.mark.parametrize("seed", SEEDS)
def test_swap_and_move_reorder_only(seed: int) -> None:
    for kind in ("swap", "move"):
        out = packets(kind, seed)
        assert Counter(out) == Counter(SESSION)
    assert len(changed(packets("swap", seed))) in (0, 2)  # 0: two equal packets


@pytest.mark.parametrize("seed", SEEDS)
def test_splice_joins_a_start_and_an_end(seed: int) -> None:
    out = packets("splice", seed)
    assert any(
        out == SESSION[:i] + OTHER[j:]
        for i in range(len(SESSION) + 1)
        for j in range(len(OTHER) + 1)
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_byte_mutations(seed: int) -> None:
    data = b"".join(SESSION)
    flipped = stream("bit_flip", seed)
    bits = sum((a ^ b).bit_count() for a, b in zip(data, flipped, strict=True))
    assert 1 <= bits <= 8
    cut = stream("truncate", seed)
    assert data.startswith(cut)
    noisy = stream("garbage", seed)
    inserted = len(noisy) > len(data) and any(
        noisy.startswith(data[:at]) and noisy.endswith(data[at:]) for at in range(len(data) + 1)
    )
    assert inserted or len(noisy) <= 4096  # or instead of everything


def test_apply_without_mutations_is_the_capture() -> None:
    assert m.apply(random.Random(0), (), SESSION, [OTHER]) == b"".join(SESSION)


def test_every_kind_changes_the_session() -> None:
    data = b"".join(SESSION)
    for kind in m.KINDS:
        assert any(m.apply(random.Random(s), (kind,), SESSION, [OTHER]) != data for s in SEEDS)
