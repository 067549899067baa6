"""The black-box socket fuzzer (fuzz/blackbox.py) against a real bridge and a real SDK policy,
with well-formed traffic from the project's load tool beside it (docs/reliability.md).

Two policies, each in its own process: the benchmark's (tests/faults/fleet.py: decides at
end of message only, the headers arrive without waiting) and one that decides at every
stage (fuzz/every_stage_policy.py: the bridge waits for it at each command).
FUZZ_BLACKBOX_SECONDS (default 10) is how long the fuzzer runs per policy, e.g. 300 for a
long run; FUZZ_BLACKBOX_SEED its seed (default: a new one each run; every failure names
it, and ``python -m fuzz.blackbox TARGET --replay SEED:INDEX`` sends one input again).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fuzz.exchange import Ending, Patience, Target, exchange
from fuzz.inputs import FuzzInput, make_input, packet_ends, sessions
from fuzz.mutate import KINDS, MAX_INPUT
from tests.faults.fleet import ROOT, fds_settle, load
from tests.fuzz.policies import POLICIES, every_stage_fleet

SECONDS = float(os.environ.get("FUZZ_BLACKBOX_SECONDS", "10"))
SEED = int(os.environ.get("FUZZ_BLACKBOX_SEED", str(int.from_bytes(os.urandom(3)))))
CONNECTIONS = 16  # fuzz connections at once
DEADLINE = 5.0  # the bridge's, every stage; the fuzzer's hang bound is this + 5 s
LOAD_BATCH = 40  # a multiple of 10: the load tool marks every 10th message exactly
LOAD_CONCURRENCY = 4
# Peak RSS: what the bridge holds for one connection is bounded by what it was sent (a
# fuzz input is at most fuzz.mutate.MAX_INPUT, 1 MiB) and by its limits: one packet being
# reassembled (--max-packet-size, 1 MiB), the headers kept for the policy
# (--max-header-buffer, 1 MiB) and their copy in the request: 3 MiB for each of the 20
# connections at once (16 fuzz, 4 load). The bound does not grow with the run, so it is
# a leak check too, a coarse one: about 1 KiB per connection passes it within a 5-minute
# run (30,000 to 60,000 connections), tens of KiB within the 10 s one.
RSS_MARGIN_KB = (CONNECTIONS + LOAD_CONCURRENCY) * 3 * MAX_INPUT // 1024
PROTOCOL_ERROR = "closing the connection: the MTA broke the protocol: "
CUT_PACKET = "the MTA closed the connection inside a packet"
CONN = re.compile(r"conn=(\S+?)[: ]")


def test_a_seed_gives_the_same_inputs() -> None:
    first = [make_input(7, i) for i in range(300)]
    assert first == [make_input(7, i) for i in range(300)]
    assert [i.data for i in first] != [make_input(8, i).data for i in range(300)]
    # All kinds, stacked and alone, and captures as they are; writes that join back.
    assert {k for i in first for k in i.kinds} == set(KINDS)
    assert any(not i.kinds for i in first)
    assert all(b"".join(w for w, _ in i.writes()) == i.data for i in first)
    assert len({len(i.ends) for i in first}) > 10


def test_the_same_input_in_another_process(tmp_path: Path) -> None:
    """``--replay SEED:INDEX --write FILE``: the bytes this process makes, whatever the
    hash seed of the other."""
    for name in ("7:0", "7:123", "99:4567"):
        out = tmp_path / "input"
        subprocess.run(
            [sys.executable, "-m", "fuzz.blackbox", "--replay", name, "--write", str(out)],
            cwd=ROOT,
            env=os.environ | {"PYTHONHASHSEED": "12345"},
            check=True,
            capture_output=True,
        )
        seed, index = map(int, name.split(":"))
        assert out.read_bytes() == make_input(seed, index).data


def _log_checks(bridge_log: str, policy_log: str, connections: int) -> None:
    for log in (bridge_log, policy_log):
        assert " ERROR " not in log
        assert "Traceback" not in log
    lines = bridge_log.splitlines()
    broken = [line for line in lines if PROTOCOL_ERROR in line]
    # The fuzz traffic reached the bridge: one WARNING for each connection it closed on a
    # protocol error (about half the inputs), and for MTAs that left inside a packet.
    assert len(broken) >= connections // 4, (len(broken), connections)
    assert all(" WARNING " in line for line in broken)
    per_connection = Counter(m[1] for line in broken if (m := CONN.search(line)))
    assert sum(per_connection.values()) == len(broken)
    assert max(per_connection.values()) == 1
    assert any(CUT_PACKET in line and " WARNING " in line for line in lines)


@pytest.mark.timeout(SECONDS + 150)
@pytest.mark.parametrize("policy_kind", list(POLICIES))
async def test_fuzz_beside_well_formed_traffic(tmp_path: Path, policy_kind: str) -> None:
    world, answered_by_the_policy = POLICIES[policy_kind]
    async with world(tmp_path, "--deadline", f"{DEADLINE:g}") as (policy, bridge):
        warm = await load(bridge, LOAD_BATCH, LOAD_CONCURRENCY)
        assert answered_by_the_policy(warm), warm
        baseline = await fds_settle(bridge, bridge.open_fds())
        rss_start = bridge.status_kb("VmRSS")

        summary_path = tmp_path / "summary.json"
        fuzzer = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "fuzz.blackbox", f"unix:{bridge.socket_path}"),
            *("--duration", f"{SECONDS:g}", "--connections", str(CONNECTIONS)),
            *("--seed", str(SEED), "--deadline", f"{DEADLINE:g}", "--json", str(summary_path)),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        fuzzing = asyncio.create_task(fuzzer.communicate())
        reports = []
        while not fuzzing.done():  # well-formed traffic for as long as the fuzzer runs
            reports.append(await load(bridge, LOAD_BATCH, LOAD_CONCURRENCY))
        text = (await fuzzing)[0].decode()
        reports.append(await load(bridge, LOAD_BATCH, LOAD_CONCURRENCY))  # and after it
        print(text)

        assert fuzzer.returncode == 0, f"seed {SEED}:\n{text}"
        summary = json.loads(summary_path.read_text())
        ended = summary["ended"]
        assert ended[Ending.HANG] == 0
        assert summary["bad_reply_count"] == 0
        assert ended[Ending.CONNECT_FAILED] == 0
        assert ended[Ending.REPLIED] > 0
        assert ended[Ending.SILENT] > 0
        assert summary["connections"] >= CONNECTIONS

        messages = sum(r.messages for r in reports)
        failed = [r for r in reports if not answered_by_the_policy(r)]
        assert not failed, (SEED, failed[0])

        assert bridge.proc is not None
        assert bridge.proc.poll() is None  # still serving
        rss_peak, rss_end = bridge.status_kb("VmHWM"), bridge.status_kb("VmRSS")
        fds = await fds_settle(bridge, baseline)
        print(
            f"well-formed messages {messages} (all the policy's verdicts);"
            f" RSS start {rss_start} kB, peak {rss_peak} kB, end {rss_end} kB;"
            f" fds {baseline} -> {fds}"
        )
        assert rss_peak <= rss_start + RSS_MARGIN_KB, (rss_start, rss_peak)
        assert fds <= baseline + 1, (baseline, fds)
    _log_checks(bridge.log(), policy.log_path.read_text(), summary["connections"])


async def test_lockstep_gets_a_whole_session_through(tmp_path: Path) -> None:
    """Packet by packet, waiting for the replies as an MTA does, a captured session with
    four messages gets through a policy that decides every stage; in one write it is cut
    off after 16 commands queued behind the first answer."""
    data = b"".join(dict(sessions())["postfix-smtpd-v6-multi"])
    ends = packet_ends(data)
    paced = FuzzInput(0, 0, "paced", (), data, ends, (0.0,) * len(ends), lockstep=True)
    blast = FuzzInput(0, 1, "blast", (), data, (len(data),), (0.0,))
    async with every_stage_fleet(tmp_path, "--deadline", f"{DEADLINE:g}") as (_, bridge):
        target = Target.parse(f"unix:{bridge.socket_path}")
        # As patient as an MTA: a reply may take up to the bridge's deadline.
        whole = await exchange(target, paced, DEADLINE + 5, Patience(DEADLINE, DEADLINE))
        cut = await exchange(target, blast, DEADLINE + 5)
    assert whole.ending is Ending.REPLIED
    assert whole.replies >= 60  # OPTNEG, then an answer to each command and 4 messages' ends
    assert bridge.log().count(" end of message: continue ") == 4
    assert cut.ending is Ending.SILENT
    assert "commands without waiting for an answer" in bridge.log()
