"""Loader for the protocol captures in tests/fixtures/captured (see the README there)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CAPTURED = Path(__file__).parent / "fixtures" / "captured"


@dataclass(frozen=True)
class Packet:
    from_mta: bool
    frame: bytes  # the whole packet, length prefix included

    @property
    def code(self) -> bytes:
        return self.frame[4:5]


@dataclass(frozen=True)
class Capture:
    name: str
    source: str
    milter: str
    packets: tuple[Packet, ...]

    def exchanges(self) -> list[tuple[bytes, list[bytes]]]:
        """Each MTA packet with the milter packets that followed it before the next MTA packet."""
        out: list[tuple[bytes, list[bytes]]] = []
        for p in self.packets:
            if p.from_mta:
                out.append((p.frame, []))
            else:
                out[-1][1].append(p.frame)
        return out


def load(path: Path) -> Capture:
    data = json.loads(path.read_text())
    packets = tuple(Packet(p["dir"] == "mta", bytes.fromhex(p["hex"])) for p in data["packets"])
    return Capture(path.stem, data["source"], data["milter"], packets)


def all_captures() -> list[Capture]:
    return [load(p) for p in sorted(CAPTURED.glob("*.json"))]
