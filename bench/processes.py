"""Milter processes: started pinned to one core, stopped, and measured from /proc.

CPU time is read from /proc/PID/stat rather than from psutil or getrusage: utime
and stime there cover every thread of the process, also threads that have
already ended (libmilter and pymilter run one thread per MTA connection, and a
connection's thread is gone by the time a run ends), and cutime/cstime add the
children it has reaped. Live children are found by their parent pid and counted
the same way, so a measurement covers the whole process tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
ROOT = Path(__file__).resolve().parent.parent


class BenchFailure(Exception):
    """The benchmark cannot go on (or a milter answered wrongly): reported loudly, exit 1."""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None when it is gone.

    The name is in parentheses and may itself hold spaces and parentheses, hence
    the split at the last ")"; the returned list starts with field 3 (state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid``, all its threads and all its children."""
    ticks = 0
    for p in (pid, *descendants(pid)):
        fields = _stat_fields(p)
        if fields is not None:
            # utime, stime, cutime, cstime: fields 14-17 of proc(5).
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLOCK_TICKS


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (shared pages counted in each)."""
    total = 0
    for p in (pid, *descendants(pid)):
        try:
            resident = Path(f"/proc/{p}/statm").read_text().split()[1]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(resident) * PAGE_SIZE
    return total


def check_cores(*cores: int) -> None:
    """Fail unless taskset exists and every core is one this process may run on."""
    if shutil.which("taskset") is None:
        msg = "taskset not found (Debian: util-linux)"
        raise BenchFailure(msg)
    allowed = os.sched_getaffinity(0)
    if missing := sorted(set(cores) - allowed):
        msg = f"core(s) {missing} not available here (allowed: {sorted(allowed)})"
        raise BenchFailure(msg)


Cores = int | tuple[int, ...]  # one core, or a set of them a process may run on


def listed(cores: Cores) -> tuple[int, ...]:
    return (cores,) if isinstance(cores, int) else cores


def pinned(core: Cores, argv: Sequence[str]) -> list[str]:
    """``argv`` run under ``taskset -c core``; taskset execs it, so the pid stays the same."""
    return ["taskset", "-c", ",".join(str(c) for c in listed(core)), *argv]


class Process:
    """One process of a milter setup, pinned to a core, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        core: Cores,
        log_dir: Path,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        """``stop_signal``: libmilter notices SIGTERM only at its listener's next poll
        timeout (seconds), so its milters are stopped with SIGKILL."""
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._stop_signal = stop_signal
        with self.log.open("wb") as out:
            # A session of its own: a Ctrl-C at the terminal reaches only the benchmark,
            # which then stops its processes in order (and the measurement is not mixed
            # with a process reacting to the signal on its own).
            self._popen = subprocess.Popen(  # noqa: S603 - argv built by the benchmark
                pinned(core, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._popen.pid

    def alive(self) -> bool:
        return self._popen.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            msg = (
                f"{self.name} exited with status {self._popen.returncode};"
                f" the end of {self.log}:\n{self.log_tail()}"
            )
            raise BenchFailure(msg)

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Until ``text`` appears in the process's output."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                msg = f"{self.name} did not log {text!r} within {timeout:g} s:\n{self.log_tail()}"
                raise BenchFailure(msg)
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self._popen.send_signal(self._stop_signal)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Name and user plus system CPU time of each live thread of ``pid``, by thread id."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            text = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return threads


def steal_seconds(core: int) -> float:
    """Time the hypervisor ran something else while this core had work (/proc/stat, steal).

    On a virtual machine a neighbour's load shows here and not in any process's
    CPU time, as a run slower than the others."""
    label = f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == label:
            return int(fields[8]) / CLOCK_TICKS
    msg = f"no {label} in /proc/stat"
    raise BenchFailure(msg)
