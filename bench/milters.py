"""The milter setups of the benchmark and how each is started.

Every milter listens on a unix socket, the bridge's policy too. Over TCP
loopback libmilter would be measured wrongly: it writes an added header and
the final reply of end of message in two writes, and Nagle's algorithm holds
the second until the MTA's delayed ACK of the first (about 40 ms per message).
One transport for all, and the one where no milter pays that.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.idle import wait_until_negotiating
from bench.install import C_HEADER_EOM, C_POLICY, compile_milter
from bench.processes import Cores, Process

READY_TIMEOUT = 30.0  # seconds for a milter to answer OPTNEG after it was started


@dataclass(frozen=True, slots=True)
class Milter:
    key: str  # as --milters names it
    label: str  # in the table
    policy_apart: bool  # its policy runs in a process of its own
    bridge_flags: tuple[str, ...] = ()  # the bridge's, beside --listen and --upstream


C_ALL = Milter("c-all", "libmilter C, every callback", policy_apart=False)
C_HEADER_EOM_ONLY = Milter("c-hdr-eom", "libmilter C, header + eom only", policy_apart=False)
PYMILTER = Milter("pymilter", "pymilter, every callback", policy_apart=False)
# The bridge as deployed: its defaults, which carry the SDK policy's sessions on shared streams.
BRIDGE = Milter("bridge", "bridge + SDK policy", policy_apart=True)
BRIDGE_PROCESS = Milter(
    "bridge-process",
    "bridge (a Process stream per session) + SDK policy",
    policy_apart=True,
    bridge_flags=("--policy-streams", "0"),
)
MILTERS = {m.key: m for m in (C_ALL, C_HEADER_EOM_ONLY, PYMILTER, BRIDGE, BRIDGE_PROCESS)}


@dataclass(frozen=True, slots=True)
class Binaries:
    c_all: Path
    c_header_eom: Path


def build(directory: Path) -> Binaries:
    return Binaries(
        compile_milter(C_POLICY, directory / "c_policy"),
        compile_milter(C_HEADER_EOM, directory / "c_milter"),
    )


@dataclass(frozen=True, slots=True)
class Running:
    milter: Milter
    socket: Path  # where the MTA side connects
    main: Process  # the milter, or the bridge
    policy: Process | None  # the SDK policy behind the bridge

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def processes(self) -> list[Process]:
        return [self.main] if self.policy is None else [self.main, self.policy]


@contextmanager
def started(
    milter: Milter,
    directory: Path,
    *,
    core: Cores,
    marker: str,
    binaries: Binaries | None = None,
) -> Iterator[Running]:
    """``milter`` on core ``core``, answering OPTNEG; stopped after the block.

    ``binaries``: the C milters, built by ``build`` (only they need it)."""
    sock = directory / f"{milter.key}.sock"
    python = sys.executable
    processes: list[Process] = []
    try:
        policy = None
        if milter.policy_apart:
            policy_sock = directory / "policy.sock"
            policy_argv = [python, "-m", "bench.sdk_policy", f"unix:{policy_sock}", marker]
            policy = Process("policy", policy_argv, core=core, log_dir=directory)
            processes.append(policy)
            # The bridge fetches the capabilities when it starts; a policy not yet
            # listening would put that behind gRPC's reconnect backoff.
            policy.wait_for_log("serving on", READY_TIMEOUT)
            bridge_argv = [
                *(python, "-m", "milter_bridge"),
                *("--listen", f"unix:{sock}", "--upstream", f"unix:{policy_sock}"),
                *milter.bridge_flags,
            ]
            main = Process("bridge", bridge_argv, core=core, log_dir=directory)
        elif milter is PYMILTER:
            argv = [python, "-m", "bench.pymilter_policy", f"unix:{sock}", marker]
            # pymilter runs libmilter's loop: SIGKILL as for the C milters.
            main = Process(
                milter.key, argv, core=core, log_dir=directory, stop_signal=signal.SIGKILL
            )
        else:
            assert binaries is not None, "build() the C milters first"
            binary = binaries.c_all if milter is C_ALL else binaries.c_header_eom
            main = Process(
                milter.key,
                [str(binary), f"unix:{sock}", marker],
                core=core,
                log_dir=directory,
                stop_signal=signal.SIGKILL,
            )
        processes.insert(0, main)
        wait_until_negotiating(str(sock), processes, READY_TIMEOUT)
        yield Running(milter, sock, main, policy)
    finally:
        # The bridge first: stopped before its policy, it has no stream to lose.
        for p in processes:
            p.stop()
