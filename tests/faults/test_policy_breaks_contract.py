"""Fault matrix: a policy that breaks the contract in every way of ``tests/faults/breaches.py``,
under load (c=8), while half of its SMTP sessions behave.

The rogue policy (``tests/faults/rogue.py``) prints which session got which breach
and what it decided itself; the bridge logs, per MTA connection (``conn=``), what
it answered. So each message is checked on its own: a well-behaved session (or a
tolerated breach) got the policy's own verdict and no failure, a breach got the
failure action (tempfail) at its stage, with one WARNING whose reason names the
breach. The load's outcomes and the bridge's metrics (failure actions by stage
and cause) must add up to the same. Every answer within the deadline plus 1 s,
none missing; the bridge up, its descriptors and memory back, no ERROR line or
traceback, and afterwards a well-behaved load is answered wholly by the policy.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from milter_bridge.load import Report
from milter_bridge.metrics import CAUSES
from tests.faults import breaches
from tests.faults.breaches import BREACHES, EOM
from tests.faults.fleet import MARKER, PolicyProcess, answered_by_the_policy, fds_settle, load
from tests.faults.record import RSS_SLACK_KB, Probe, Row, scale
from tests.faults.rogue import GOOD
from tests.runtime.process import BridgeProcess
from tests.runtime.test_metrics import get

DEADLINE = 2.0  # seconds, every stage
REPEATS = scale(3)  # sessions per breach; as many behave
COUNT = 2 * len(BREACHES) * REPEATS
LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+) (?P<text>.*)$")
FAILURE = re.compile(
    r"conn=(?P<conn>\S+?)(?: qid=\S+)?: policy failure at (?P<stage>\w+):"
    r" (?P<reason>.*); answering (?P<action>\w+)$"
)
ENDED = re.compile(r"conn=(?P<conn>\S+?)(?: qid=\S+)?: end of message: (?P<verdict>\w+) \(")
LINGERED = "policy did not end its stream within 5s; cancelling it"
Labels = frozenset[tuple[str, str]]
Outcome = tuple[str, tuple[str, str] | None]  # the load's label; (stage, cause) of a failure


class RogueProcess(PolicyProcess):
    """The test's side: ``python -m tests.faults.rogue unix:PATH``, its switch and its record."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "tests.faults.rogue", self.target]

    async def switch(self, mode: str) -> None:
        """Rogue or good; returns once the policy says it is (its line is the barrier)."""
        line = f"\nmode {mode}\n"
        seen = ("\n" + self.log()).count(line)
        self.signal(signal.SIGUSR1)
        async with asyncio.timeout(10):
            while ("\n" + self.log()).count(line) == seen:
                await asyncio.sleep(0.02)

    def record(self) -> tuple[dict[str, str], dict[str, str]]:
        """By MTA connection (the bridge's ``conn=``): each rogue-mode session's part, and
        the verdicts the policy gave itself at end of message."""
        parts: dict[str, str] = {}
        decided: dict[str, str] = {}
        for line in self.log().splitlines():
            kind, _, rest = line.partition(" ")
            session, _, value = rest.partition(" ")
            conn = session.rpartition(".")[0]  # session ids are CONN.N
            if kind == "session":
                parts[conn] = value
            elif kind == "decided":
                assert conn not in decided, line  # one verdict per session
                decided[conn] = value
        return parts, decided


async def samples(bridge: BridgeProcess) -> dict[tuple[str, Labels], float]:
    """Every sample of the bridge's /metrics, by name and labels."""
    found = re.search(r"metrics and health on http://127\.0\.0\.1:(\d+)/", bridge.log())
    assert found is not None
    status, body = await get(int(found.group(1)), "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


async def until_logged(bridge: BridgeProcess, text: str, count: int) -> None:
    async with asyncio.timeout(30):
        while bridge.log().count(text) < count:
            await asyncio.sleep(0.05)


def by_connection(log: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
    """Per ``conn=``: its failures (stage, reason), and its end-of-message verdicts."""
    failures: dict[str, list[tuple[str, str]]] = defaultdict(list)
    ended: dict[str, list[str]] = defaultdict(list)
    for line in log.splitlines():
        if (failure := FAILURE.search(line)) is not None:
            assert failure["action"] == "tempfail", line
            failures[failure["conn"]].append((failure["stage"], failure["reason"]))
        elif (end := ENDED.search(line)) is not None:
            ended[end["conn"]].append(end["verdict"])
    return failures, ended


def lost_races(parts: dict[str, str], log: str) -> set[str]:
    """Connections whose breach lost the race it cannot always win (``Breach.raced``): the
    bridge logged no failure for them and answered with the breach's own verdict."""
    failures, ended = by_connection(log)
    return {
        conn
        for conn, name in parts.items()
        if (raced := getattr(BREACHES.get(name), "raced", None)) is not None
        and not failures[conn]
        and ended[conn] == [raced]
    }


def expected(name: str, conn: str, decided: dict[str, str], raced: set[str]) -> Outcome:
    """What the MTA must get for one session: the load's outcome and the failure, if any."""
    labels = {"continue": "eom continue", "reject": "eom reject 550"}
    breach = BREACHES.get(name)
    if breach is None or breach.stage is None or breach.cause is None:
        return labels[decided[conn]], None  # behaved, or tolerated: the policy's verdict
    if conn in raced:
        return f"eom {breach.raced}", None
    label = "eom tempfail" if breach.stage == EOM else "mail tempfail"
    return label, (breach.stage, breach.cause)


def check_each_connection(
    parts: dict[str, str], decided: dict[str, str], raced: set[str], log: str
) -> None:
    """What each of the rogue's sessions got from the bridge, by the MTA connection's id."""
    failures, ended = by_connection(log)
    for conn, name in parts.items():
        breach = BREACHES.get(name)
        if conn in raced:
            continue  # lost_races() checked it
        if breach is None or breach.stage is None:  # behaved, or tolerated: the policy's verdict
            assert failures[conn] == [], (conn, name, failures[conn])
            assert ended[conn] == [decided.get(conn)], (conn, name, ended[conn])
            continue
        assert conn not in decided, (conn, name)
        ((stage, reason),) = failures[conn]  # exactly one failure line
        assert stage == breach.stage, (conn, name, stage, reason)
        assert re.search(breach.reason, reason), (conn, name, reason)
        assert ended[conn] == (["tempfail"] if stage == EOM else []), (conn, name, ended[conn])


def check_answers(
    report: Report, parts: dict[str, str], decided: dict[str, str], raced: set[str]
) -> None:
    """The rogue load as the MTA saw it; ``parts`` and ``decided``: the rogue's record."""
    shown = (report.outcomes, report.latency, report.protocol_errors)
    # Every breach REPEATS times, in as many sessions as behaved.
    assert len(parts) == COUNT, shown
    assert Counter(parts.values()) == {GOOD: COUNT // 2} | dict.fromkeys(BREACHES, REPEATS)
    # Every message answered, never with nothing, and in time.
    assert report.ok, shown
    assert report.messages == report.latency.messages == COUNT, shown
    assert report.latency.max_ms <= (DEADLINE + 1) * 1000, shown  # per message
    assert report.latency.worst_answer_ms <= (DEADLINE + 1) * 1000, shown  # per answer
    # Only the policy's verdicts and the failure action, each where it belongs.
    outcomes = Counter(expected(n, c, decided, raced)[0] for c, n in parts.items())
    assert report.outcomes == outcomes, shown
    # A modification reached the MTA only with the policy's own verdict (not even the
    # valid add_header before a refused one).
    continued = Counter(decided.values())["continue"]
    assert report.modifications == {"add_header": continued}, report.modifications
    assert report.progress >= 1  # from the progress floods, rate-limited


def expected_failures(
    parts: dict[str, str], decided: dict[str, str], raced: set[str]
) -> Counter[tuple[str, str]]:
    """Failure actions by (stage, cause)."""
    failures = (expected(n, c, decided, raced)[1] for c, n in parts.items())
    return Counter(f for f in failures if f is not None)


def check_log(log: str, failures: int) -> None:
    """One WARNING per failure and one per lingering stream, and nothing worse."""
    lines = [LINE.match(line) for line in log.splitlines()]
    assert None not in lines, log  # nothing but the bridge's own lines (no gRPC Core output)
    warnings = [m["text"] for m in lines if m is not None and m["level"] == "WARNING"]
    assert len([w for w in warnings if FAILURE.search(w)]) == failures
    assert len([w for w in warnings if w.endswith(LINGERED)]) == REPEATS
    assert len(warnings) == failures + REPEATS, warnings
    assert {m["level"] for m in lines if m is not None} == {"INFO", "WARNING"}
    assert " ERROR " not in log
    assert "Traceback" not in log


async def test_a_policy_breaking_the_contract_in_every_way_under_load(
    tmp_path: Path, policy_path: tuple[str, ...]
) -> None:
    assert MARKER.encode() == breaches.MARKER
    assert breaches.__doc__ is not None
    assert all(f"``{name}``" in breaches.__doc__ for name in BREACHES)  # the list is whole
    # The one tolerated breach the bridge logs: a stream not ended after the half-close.
    assert [b.reason for b in BREACHES.values() if b.stage is None and b.reason] == [LINGERED]
    policy = RogueProcess(tmp_path / "rogue.sock")
    await policy.start()
    flags = (*policy_path, "--deadline", f"{DEADLINE:g}", "--metrics-listen", "127.0.0.1:0")
    bridge = BridgeProcess(tmp_path / "bridge.sock", policy.target, *flags)
    try:
        await bridge.start()
        warm = await load(bridge, 50)  # the channel is up, the policy decides
        assert answered_by_the_policy(warm), warm
        await fds_settle(bridge, bridge.open_fds())
        before = Probe.take(bridge)

        await policy.switch("rogue")
        report = await load(bridge, COUNT)
        # Whole: each line was printed, or logged, before the answer it tells of was sent.
        parts, decided = policy.record()
        raced = lost_races(parts, bridge.log())
        check_each_connection(parts, decided, raced, bridge.log())
        check_answers(report, parts, decided, raced)
        await policy.switch("good")
        after = await load(bridge, 50)  # the barrier: the bridge serves the policy's verdicts
        assert answered_by_the_policy(after), after

        await until_logged(bridge, LINGERED, REPEATS)  # cancelled 5 s after the half-close
        assert bridge.proc is not None
        assert bridge.proc.poll() is None  # still serving
        await fds_settle(bridge, before.fds)
        settled, rss_peak = Probe.take(bridge), bridge.status_kb("VmHWM")
        metrics = await samples(bridge)
        failures = {
            (by["stage"], by["cause"]): value
            for (name, labels), value in metrics.items()
            if name == "milter_bridge_failure_actions_total" and (by := dict(labels))
        }
        retries = metrics["milter_bridge_upstream_stream_retries_total", frozenset()]
    finally:
        await bridge.stop()
        await policy.stop()
    case = f"a policy breaking the contract in {len(BREACHES)} ways, half its sessions, c=8"
    row = Row.build(case, [report, after], before, settled, DEADLINE).save()
    failed = expected_failures(parts, decided, raced)
    print(  # what the matrix's row does not show (pytest -s)
        f"{row}; by cause {dict(failed)}; modifications {report.modifications};"
        f" progress {report.progress}; early answers taken {len(raced)}; retries {retries:g};"
        f" peak RSS {rss_peak} kB"
    )
    check_log(bridge.log(), failed.total())
    # The metrics count every failure by stage and cause; every cause occurred. The
    # stream that was UNAVAILABLE before a reply was used was opened twice more.
    assert {k: v for k, v in failures.items() if v} == failed, failures
    assert {cause for _, cause in failed} == set(CAUSES)
    assert row.failure_actions == failed.total()
    assert retries == 2 * REPEATS
    # At least one early answer came before its request was sent, and was refused.
    assert len(raced) < REPEATS
    # Descriptors back to the baseline (+1), memory near it; the 64 MiB answers were
    # refused before they were held.
    row.assert_settled()
    assert rss_peak <= before.rss_kb + 2 * RSS_SLACK_KB, (before, rss_peak)
