"""The bridge as a process: bounded memory, no growth over thousands of connections,
SIGTERM drain, and a bad configuration stopping it at start with a clear message."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.v1 import policy_pb2 as pb
from tests.runtime.policy import PolicyServer, verdict
from tests.runtime.process import BridgeProcess
from tests.session import harness as h

# The stated limit (README): peak RSS of the bridge with a 50 MB body, 10,000
# headers and 10,000 recipients streaming through to a slow policy.
PEAK_RSS_LIMIT_MB = 120


@pytest.fixture
async def bridge_factory(tmp_path: Path) -> AsyncIterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for process in started:
        await process.stop()


async def start_bridge(
    started: list[BridgeProcess], tmp_path: Path, upstream: str, *flags: str
) -> BridgeProcess:
    process = BridgeProcess(tmp_path / f"bridge{len(started)}.sock", upstream, *flags)
    started.append(process)
    await process.start()
    return process


async def test_memory_stays_bounded_with_huge_messages_and_a_slow_policy(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    caps = h.capabilities(
        rcpt_to=h.OBSERVE,
        header=h.OBSERVE,
        body=h.OBSERVE,
        end_of_message=h.DECIDE,
        body_delivery=pb.BODY_DELIVERY_STREAM,
        end_of_message_content=pb.EndOfMessageContent(envelope=True, headers=True),
    )
    policy.policy.capabilities = caps
    seen = 0

    async def slow(request: pb.ProcessRequest) -> None:
        nonlocal seen
        seen += 1
        if seen % 500 == 0:
            await asyncio.sleep(0.02)  # a slow policy: the bridge must wait, not buffer

    async def accept(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        return [verdict(request, pb.ACTION_ACCEPT)]

    policy.policy.on_request = slow
    policy.policy.decide = accept
    bridge = await start_bridge(
        bridge_factory, tmp_path, policy.target, "--deadline", "end_of_message=300"
    )
    baseline_mb = bridge.status_kb("VmRSS") / 1024
    mta = await bridge.connect()
    await mta.negotiate()
    await mta.send(*h.mail())  # CONNECT and HELO were switched off (NO* flags)
    for n in range(10_000):
        await mta.send(cmd.Rcpt(f"<rcpt{n}@example.test>".encode()))
    for n in range(10_000):
        await mta.send(cmd.Header(b"X-Filler", f"header number {n} ".encode() * 3))
    chunk = (b"x" * 998 + b"\r\n") * 65  # 65,000 bytes
    for _ in range(50_000_000 // len(chunk)):
        await mta.send(cmd.Body(chunk))
    replies = await mta.command(*h.eom())
    await mta.close()
    assert replies == [r.Accept()]
    assert seen > 20_000  # every event went through the slow policy
    peak_mb = bridge.status_kb("VmHWM") / 1024
    print(f"bridge RSS: baseline {baseline_mb:.0f} MB, peak {peak_mb:.0f} MB")
    assert peak_mb < PEAK_RSS_LIMIT_MB


async def test_memory_stays_bounded_with_huge_recipients(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    # 300 recipients of about 1 MB each (found by independent checks: 348 MB of RSS,
    # every recipient held for the end-of-message envelope without a bound).
    caps = h.capabilities(
        rcpt_to=h.OBSERVE,
        end_of_message=h.DECIDE,
        end_of_message_content=pb.EndOfMessageContent(envelope=True),
    )
    policy.policy.capabilities = caps
    envelopes: list[pb.Envelope] = []

    async def accept(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        envelopes.append(request.end_of_message.envelope)
        return [verdict(request, pb.ACTION_ACCEPT)]

    policy.policy.decide = accept
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target)
    baseline_mb = bridge.status_kb("VmRSS") / 1024
    mta = await bridge.connect()
    await mta.negotiate()
    await mta.send(*h.mail())
    for n in range(300):
        await mta.send(cmd.Rcpt(b"<%d@example.test" % n + b"x" * 1_000_000 + b">"))
    assert await mta.command(*h.eom()) == [r.Accept()]
    await mta.close()
    (envelope,) = envelopes
    assert envelope.recipients_truncated
    assert len(envelope.recipients) <= 1  # --max-recipient-buffer: 1 MiB
    peak_mb = bridge.status_kb("VmHWM") / 1024
    print(f"bridge RSS: baseline {baseline_mb:.0f} MB, peak {peak_mb:.0f} MB")
    assert peak_mb < PEAK_RSS_LIMIT_MB


async def one_session(bridge: BridgeProcess) -> None:
    mta = await bridge.connect()
    await mta.negotiate()
    assert await mta.command(*h.connect()) == [r.Continue()]
    assert await mta.command(*h.eom()) == [r.Continue()]
    await mta.send(cmd.Abort(), cmd.Quit())
    assert await mta.closed_by_peer()
    await mta.close()


async def assert_no_growth(
    bridge: BridgeProcess,
    session: Callable[[BridgeProcess], Awaitable[None]],
    *,
    warm_up: int,
    then: int,
) -> None:
    """Open descriptors and RSS after ``then`` more sessions (10 at a time) stay put."""

    async def batch(n: int) -> None:
        for _ in range(n // 10):
            await asyncio.gather(*(session(bridge) for _ in range(10)))

    await batch(warm_up)  # caches, grpc pools, the allocator settle
    fds, rss = bridge.open_fds(), bridge.status_kb("VmRSS")
    await batch(then)
    grown_kb = bridge.status_kb("VmRSS") - rss
    print(f"{warm_up + then} connections: fds {fds} -> {bridge.open_fds()}, RSS +{grown_kb} KiB")
    assert bridge.open_fds() <= fds
    assert grown_kb < 4096


async def test_no_descriptor_or_memory_growth_over_thousands_of_connections(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target)

    await assert_no_growth(bridge, one_session, warm_up=500, then=3000)
    streams = policy.policy.streams
    assert len(streams) == 3500
    # The MTA's socket closes first; the streams' half-close may still be under way.
    await asyncio.wait_for(asyncio.gather(*(s.finished.wait() for s in streams)), 30)
    assert all(s.ended_by_bridge for s in streams)  # every stream half-closed, none cancelled


async def test_sigterm_lets_the_session_in_flight_finish(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target, "--grace-period", "30")
    mta = await bridge.connect()
    await mta.negotiate()
    assert await mta.command(*h.connect()) == [r.Continue()]
    bridge.signal(signal.SIGTERM)
    while "no new connections" not in bridge.log():  # readiness: the bridge stopped accepting
        await asyncio.sleep(0.02)
    with pytest.raises(ConnectionRefusedError):
        await bridge.connect()
    # The SMTP session in flight goes on to the end.
    assert await mta.command(*h.eom()) == [r.Continue()]
    await mta.send(cmd.Quit())
    assert await mta.closed_by_peer()
    await mta.close()
    assert await bridge.wait() == 0
    assert "stopped" in bridge.log()


async def test_sighup_is_logged_and_ignored(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target)
    mta = await bridge.connect()
    await mta.negotiate()
    bridge.signal(signal.SIGHUP)  # its default would end the process, with no drain
    async with asyncio.timeout(10):
        while "SIGHUP ignored: nothing is reloaded" not in bridge.log():  # readiness: logged
            await asyncio.sleep(0.02)
    assert await mta.command(*h.connect()) == [r.Continue()]  # the session goes on
    await mta.close()
    await one_session(bridge)  # and new ones are taken
    assert bridge.proc is not None
    assert bridge.proc.poll() is None


async def test_sigterm_closes_what_outlives_the_grace_period(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    stuck = asyncio.Event()

    async def never(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        stuck.set()
        await asyncio.Event().wait()
        return []

    policy.policy.decide = never
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target, "--grace-period", "0.2")
    mta = await bridge.connect()
    await mta.negotiate()
    await mta.send(*h.connect())
    await stuck.wait()
    bridge.signal(signal.SIGTERM)
    # What awaited the policy gets the failure action before the connection closes.
    assert await mta.reply() == [r.TempFail()]
    assert await mta.closed_by_peer()
    await mta.close()
    assert await bridge.wait() == 0
    assert "closing 1 connections still open after the grace period" in bridge.log()


BASE = ["--listen", "inet:127.0.0.1:1", "--upstream", "p:1"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--upstream", "p:1"], "--listen: required"),
        (["--listen", "tcp:1.2.3.4:5", "--upstream", "p:1"], "--listen: 'tcp:1.2.3.4:5' is not"),
        (["--listen", "unix:relative.sock", "--upstream", "p:1"], "must be absolute"),
        (["--listen", "inet:127.0.0.1:99999", "--upstream", "p:1"], "port 99999 is out of range"),
        (["--listen", "inet:127.0.0.1:1"], "--upstream: a gRPC target is required"),
        ([*BASE, "--deadline", "x"], "--deadline: 'x' is not a number"),
        ([*BASE, "--deadline", "eom=3"], "unknown stage 'eom'"),
        ([*BASE, "--deadline", "helo=0"], "--deadline helo: 0.0 must be"),
        ([*BASE, "--failure-action", "drop"], "'drop' is not tempfail"),
        ([*BASE, "--socket-mode", "rw"], "--socket-mode: 'rw'"),
        ([*BASE, "--max-connections", "0"], "--max-connections: 0"),
        ([*BASE, "--workers", "0"], "--workers: 0 is not between 1 and 64"),
        ([*BASE, "--workers", "many"], "--workers: 'many' is neither a whole number nor auto"),
        ([*BASE, "--deadline", "inf"], "must be greater than 0 and finite"),
        ([*BASE, "--grace-period", "nan"], "--grace-period: nan is not a number"),
        ([*BASE, "--progress-interval", "30"], "Sendmail gives up on a milter silent for 10s"),
        ([*BASE, "--socket-group", "no-such-group"], "--socket-group: no group named"),
    ],
)
def test_bad_configuration_stops_at_start_naming_the_setting(
    flags: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "milter_bridge", *flags],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


async def test_unix_socket_mode_and_a_stale_socket(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    stale = tmp_path / "bridge0.sock"
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # left behind by an earlier run
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target, "--socket-mode", "660")
    assert stale.stat().st_mode & 0o777 == 0o660
    await one_session(bridge)


async def test_a_second_instance_does_not_take_a_live_socket(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    first = await start_bridge(bridge_factory, tmp_path, policy.target)
    second = BridgeProcess(first.socket_path, policy.target)
    result = await asyncio.to_thread(
        subprocess.run, second.argv, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 1
    assert "another process listens on" in result.stderr
    await one_session(first)  # the first instance still serves its socket


async def test_no_growth_on_the_failure_path_either(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    policy.policy.end_stream_after_start = True  # every stream fails: cancel, failure action
    bridge = await start_bridge(bridge_factory, tmp_path, policy.target)

    async def failing_session() -> None:
        mta = await bridge.connect()
        await mta.negotiate()
        assert await mta.command(*h.connect()) == [r.TempFail()]
        await mta.send(cmd.Quit())
        assert await mta.closed_by_peer()
        await mta.close()

    await assert_no_growth(bridge, lambda _: failing_session(), warm_up=300, then=1500)


async def test_metrics_endpoint_of_the_running_process(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    import re  # noqa: PLC0415

    from tests.runtime.test_metrics import get  # noqa: PLC0415

    bridge = await start_bridge(
        bridge_factory, tmp_path, policy.target, "--metrics-listen", "127.0.0.1:0"
    )
    found = re.search(r"metrics and health on http://127\.0\.0\.1:(\d+)/", bridge.log())
    assert found is not None, bridge.log()
    port = int(found.group(1))
    await one_session(bridge)
    await one_session(bridge)
    status, body = await get(port, "/metrics")
    assert status == 200
    assert 'milter_bridge_messages_total{verdict="continue"} 2.0' in body
    assert await get(port, "/readyz") == (200, "ready\n")

    # The same port for a second instance: it stops at start, naming the setting.
    second = BridgeProcess(
        tmp_path / "second.sock", policy.target, "--metrics-listen", f"127.0.0.1:{port}"
    )
    result = await asyncio.to_thread(
        subprocess.run, second.argv, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"milter-bridge: --metrics-listen 127.0.0.1:{port}: ")
    assert "address already in use" in result.stderr.lower()
    await one_session(bridge)  # the first instance still serves


async def test_json_logs_carry_the_fields_and_no_content(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path
) -> None:
    import json  # noqa: PLC0415

    bridge = await start_bridge(
        bridge_factory, tmp_path, policy.target, "--log-format", "json", "--log-level", "debug"
    )
    mta = await bridge.connect()
    await mta.negotiate()
    assert await mta.command(*h.connect()) == [r.Continue()]
    t_macros, data, subject_from, subject, n_macros, eoh, body = h.content()
    steps = [
        h.mail(),
        h.rcpt(),
        [t_macros, data],
        [subject_from],
        [subject],
        [n_macros, eoh],
        [body],
    ]
    for commands in steps:  # one reply each: the bridge answers what the policy skips
        assert await mta.command(*commands) == [r.Continue()]
    assert await mta.command(*h.eom()) == [r.Continue()]
    await mta.send(cmd.Quit())
    assert await mta.closed_by_peer()  # barrier: the bridge has handled the whole session
    await mta.close()
    await bridge.stop()

    records = [json.loads(line) for line in bridge.log().splitlines()]  # every line is JSON
    (ended,) = [x for x in records if x["message"].startswith("end of message")]
    assert ended["level"] == "info"
    assert ended["logger"] == "milter_bridge.connection"
    assert ended["qid"] == "QID1"
    assert ended["conn"]
    assert ended["stage"] == "end_of_message"
    assert ended["verdict"] == "continue"
    assert isinstance(ended["latency_ms"], float)
    assert not ended["message"].startswith("conn=")  # the fields are not repeated in the text
    # Even at debug level no address, header or body reaches the log.
    for content in ("sender@example.test", "rcpt@example.test", "hello", "body line"):
        assert content not in bridge.log(), content


# Queue ids an MTA (or anything posing as one) may send: a format directive, and a
# newline followed by what would read as a line of its own.
HOSTILE_QUEUE_IDS = (b"Q1%d%s", b"Q2\nERROR milter_bridge forged\x1b[31m", b"Q3\xe2\x80\xa8x")


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_mta_data_never_reaches_a_format_string_or_breaks_a_line(
    policy: PolicyServer, bridge_factory: list[BridgeProcess], tmp_path: Path, log_format: str
) -> None:
    import json  # noqa: PLC0415

    bridge = await start_bridge(bridge_factory, tmp_path, policy.target, "--log-format", log_format)
    mta = await bridge.connect()
    await mta.negotiate()
    assert await mta.command(*h.connect()) == [r.Continue()]
    for qid in HOSTILE_QUEUE_IDS:
        assert await mta.command(cmd.DefineMacro(b"E", ((b"i", qid),)), cmd.EndOfMessage()) == [
            r.Continue()
        ]
    await mta.send(cmd.Quit())
    assert await mta.closed_by_peer()  # barrier: the bridge has handled the whole session
    await mta.close()
    await bridge.stop()

    lines = bridge.log().splitlines()
    assert "Logging error" not in bridge.log()
    assert "Traceback" not in bridge.log()
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        ended = [x["qid"] for x in records if x["message"].startswith("end of message")]
        assert ended == ["Q1%d%s", "Q2\\x0aERROR milter_bridge forged\\x1b[31m", "Q3\\u2028x"]
        return
    # One line per message, each whole; nothing starts a line but a timestamp.
    ended = [line for line in lines if "end of message: continue" in line]
    assert [line.split(" qid=")[1].split(": end of message")[0] for line in ended] == [
        "Q1%d%s",
        "Q2\\x0aERROR milter_bridge forged\\x1b[31m",
        "Q3\\u2028x",
    ]
    assert all(line[:4].isdigit() for line in lines), lines
