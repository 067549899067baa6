"""The black-box socket fuzzer: mutated real MTA sessions against a running bridge.

    python -m fuzz.blackbox unix:/PATH|inet:127.0.0.1:PORT [--duration S] [--connections N]
                            [--seed X] [--deadline S | --hang-after S] [--json FILE]
                            [--record FILE]
    python -m fuzz.blackbox TARGET --replay SEED:INDEX    one input again, its outcome shown
    python -m fuzz.blackbox --replay SEED:INDEX --write FILE    the input's bytes to a file
    python -m fuzz.blackbox TARGET --send FILE [--lockstep]    a kept input, in one write

N connections stay busy for S seconds; each sends one input (fuzz/inputs.py:
a captured MTA session, mutated, in random writes, or packet by packet waiting
for the replies as an MTA does), half-closes, and reads replies until the
bridge closes. Exit status 1 when a connection hung, a reply
did not decode or a connection was refused (the bridge is gone); 0 otherwise.
``--record`` writes one JSON line per connection (input, local start and end
times as the bridge's log shows them, ending): the inputs open when the bridge
logged something unexpected are the ones to replay.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fuzz.exchange import Outcome, Target, exchange
from fuzz.inputs import FuzzInput, make_input, packet_ends
from fuzz.summary import Summary
from milter_bridge.config import DEFAULT_EOM_DEADLINE, ConfigError

# Added to the bridge's deadline to give the hang bound: time for a loaded machine.
HANG_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class FuzzConfig:
    target: str
    duration: float = 60.0
    connections: int = 16
    seed: int = 0
    # The bridge's longest stage deadline (its --deadline; by default 120 s, end of message).
    deadline: float = DEFAULT_EOM_DEADLINE
    hang_after: float | None = None  # seconds after the EOF; None: deadline + HANG_MARGIN
    record: Path | None = None  # one JSON line per connection

    @property
    def hang_bound(self) -> float:
        return self.deadline + HANG_MARGIN if self.hang_after is None else self.hang_after


async def fuzz(config: FuzzConfig) -> Summary:
    """Run for ``config.duration`` seconds; the connections open then are finished."""
    target = Target.parse(config.target)
    summary = Summary(config.target, config.seed, config.connections, config.hang_bound)
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + config.duration
    indices = itertools.count()
    records = None if config.record is None else config.record.open("w")

    async def worker() -> None:
        while loop.time() < stop_at:
            item = make_input(config.seed, next(indices))
            start = _now()
            outcome = await exchange(target, item, config.hang_bound)
            summary.add(item, outcome)
            if records is not None:
                line = {"input": item.name, "start": start, "end": _now(), "ending": outcome.ending}
                records.write(json.dumps(line) + "\n")

    try:
        await asyncio.gather(*(worker() for _ in range(config.connections)))
    finally:
        if records is not None:
            records.close()
    summary.elapsed_s = round(loop.time() - started, 3)
    return summary


def _now() -> str:
    """Local time as the bridge's plain log lines show it (milliseconds after a comma)."""
    return datetime.datetime.now().isoformat(sep=" ", timespec="milliseconds").replace(".", ",")


def parse_name(text: str) -> tuple[int, int]:
    """``SEED:INDEX`` -> (seed, index)."""
    seed, sep, index = text.partition(":")
    if not sep:
        msg = f"{text!r} is not SEED:INDEX"
        raise argparse.ArgumentTypeError(msg)
    return int(seed), int(index)


def kept_input(path: Path, *, lockstep: bool) -> FuzzInput:
    """A file's bytes as an input of its own: in one write, or packet by packet in lockstep."""
    data = path.read_bytes()
    ends = packet_ends(data) if lockstep else (len(data),)
    return FuzzInput(-1, -1, path.name, ("(kept)",), data, ends, (0.0,) * len(ends), lockstep)


def describe(item: FuzzInput, outcome: Outcome) -> str:
    return (
        f"input {item.name} from {item.base}, mutations {list(item.kinds)},"
        f" {len(item.data)} bytes in {len(item.ends)} writes"
        f"{' in lockstep' if item.lockstep else ''}:"
        f" {outcome.ending} after {outcome.after_eof * 1000:.1f} ms;"
        f" sent {outcome.sent}, received {outcome.received} ({outcome.replies} replies),"
        f" cut short: {outcome.cut_short}, undecodable: {outcome.bad_reply}"
    )


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fuzz.blackbox", description=__doc__.split("\n")[0])
    p.add_argument("target", nargs="?", help="unix:/PATH or inet:127.0.0.1:PORT")
    p.add_argument("--duration", type=float, default=60.0, metavar="S")
    p.add_argument("--connections", type=int, default=16, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_EOM_DEADLINE,
        metavar="S",
        help="the bridge's longest stage deadline (default %(default)g, its end of message)",
    )
    p.add_argument(
        "--hang-after",
        type=float,
        metavar="S",
        help=f"a connection still open this long after the EOF is a hang"
        f" (default: deadline + {HANG_MARGIN:g})",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--record", type=Path, metavar="FILE", help="one JSON line per connection")
    p.add_argument("--replay", type=parse_name, metavar="SEED:INDEX")
    p.add_argument("--write", type=Path, metavar="FILE", help="with --replay: write the bytes")
    p.add_argument("--send", type=Path, metavar="FILE", help="send a kept input")
    p.add_argument(
        "--lockstep", action="store_true", help="with --send: as an MTA, packet by packet"
    )
    args = p.parse_args(argv)
    if args.write is not None and args.replay is None:
        p.error("--write goes with --replay")
    if args.target is None and args.write is None:
        p.error("a target is required")
    return args


async def _one(config: FuzzConfig, item: FuzzInput) -> int:
    outcome = await exchange(Target.parse(config.target), item, config.hang_bound)
    print(describe(item, outcome))
    summary = Summary(config.target, item.seed, 1, config.hang_bound)
    summary.add(item, outcome)
    return 0 if summary.ok else 1


def main(argv: list[str]) -> int:
    args = _args(argv)
    if args.write is not None:
        item = make_input(*args.replay)
        args.write.write_bytes(item.data)
        print(f"input {item.name} ({item.base}, {list(item.kinds)}): {len(item.data)} bytes")
        return 0
    config = FuzzConfig(
        args.target,
        args.duration,
        args.connections,
        args.seed,
        args.deadline,
        args.hang_after,
        args.record,
    )
    try:
        Target.parse(config.target)
    except ConfigError as exc:
        print(f"python -m fuzz.blackbox: {exc}", file=sys.stderr)
        return 2
    if args.replay is not None:
        return asyncio.run(_one(config, make_input(*args.replay)))
    if args.send is not None:
        return asyncio.run(_one(config, kept_input(args.send, lockstep=args.lockstep)))
    summary = asyncio.run(fuzz(config))
    print(summary.text())
    if args.json is not None:
        args.json.write_text(summary.to_json())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
