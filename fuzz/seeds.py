"""Write the seed corpora: ``python -m fuzz.seeds`` (rewrites fuzz/corpus/<target>/).

session_feed: the MTA side of every captured session (tests/fixtures/captured),
under a few plans and read sizes. session_answer: one valid answer of each
kind for each stage it is valid at, and a few invalid ones.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import struct
from pathlib import Path

from fuzz.targets import STAGES, TARGETS, plans
from milter_bridge.session import Stage
from milter_bridge.v1 import policy_pb2 as pb
from tests.captured import all_captures

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = (
    "content_filter",
    "disclaimer",
    "envelope_rewriter",
    "header_stamper",
    "recipient_allowlist",
)


def _small(frame: bytes, cut: int = 512) -> bytes:
    """A packet with its payload cut to ``cut`` bytes (the 64 KiB body chunks slow the fuzzer)."""
    if len(frame) <= cut + 5:
        return frame
    return struct.pack(">I", cut + 1) + frame[4 : cut + 5]


def feed_seeds() -> list[bytes]:
    seeds = []
    for i, capture in enumerate(all_captures()):
        mta = b"".join(_small(p.frame) for p in capture.packets if p.from_mta)
        # The capture negotiates itself: no offer prepended (bit 0x40 clear);
        # plan, answering and read size vary across the captures.
        plan = i % 8
        step = (0, 1, 7, 64)[i % 4]
        seeds.append(bytes([plan, step]) + mta)
    return seeds


def _verdict(action: int, **reply: object) -> pb.ProcessResponse:
    v = pb.Verdict(action=action)  # type: ignore[arg-type]
    if reply:
        v.reply.CopyFrom(pb.SmtpReply(**reply))  # type: ignore[arg-type]
    return pb.ProcessResponse(verdict=v)


def answer_seeds() -> list[bytes]:
    eom = pb.EndOfMessageResponse(
        modifications=[
            pb.Modification(add_header=pb.AddHeader(name="X-A", value=b"1")),
            pb.Modification(add_recipient=pb.AddRecipient(address="<x@example.test>")),
            pb.Modification(change_header=pb.ChangeHeader(name="Subject", index=1, value=b"x")),
            pb.Modification(quarantine=pb.Quarantine(reason="held")),
            pb.Modification(replace_body=pb.ReplaceBody(body=b"new body\r\n")),
        ],
        verdict=pb.Verdict(action=pb.ACTION_CONTINUE),
    )
    answers = [
        _verdict(pb.ACTION_CONTINUE),
        _verdict(pb.ACTION_ACCEPT),
        _verdict(pb.ACTION_REJECT, code=550, enhanced_code="5.7.1", lines=["no", "never"]),
        _verdict(pb.ACTION_TEMPFAIL, code=451, lines=["later"]),
        pb.ProcessResponse(progress=pb.Progress()),
        pb.ProcessResponse(end_of_message=eom),
    ]
    seeds = []
    for s, stage in enumerate(STAGES):
        for a in answers:
            if stage is not Stage.EOM and a.WhichOneof("response") != "verdict":
                continue
            seeds.append(bytes([s, 1]) + a.SerializeToString())
    seeds.append(bytes([0, 0]) + answers[0].SerializeToString())  # wrong sequence
    seeds.append(bytes([8, 3]) + answers[-1].SerializeToString())  # answered twice
    return seeds


def capabilities_seeds() -> list[bytes]:
    """The fuzz plans' capabilities and the examples' (what real policies describe)."""
    seeds = [caps.SerializeToString() for caps in plans()]
    for name in EXAMPLES:
        policy = importlib.import_module(f"examples.{name}").policy
        seeds.append(policy.capabilities().SerializeToString())
    return seeds


def main() -> None:
    corpora = {
        "session_feed": feed_seeds(),
        "session_answer": answer_seeds(),
        "capabilities": capabilities_seeds(),
    }
    for name, seeds in corpora.items():
        assert name in TARGETS
        out = CORPUS / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for seed in seeds:
            (out / hashlib.sha1(seed).hexdigest()).write_bytes(seed)  # noqa: S324
        print(f"{name}: {len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
