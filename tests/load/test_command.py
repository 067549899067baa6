"""``milter-bridge load`` as a command: text report, exit status, usage errors."""

from __future__ import annotations

import asyncio
import re
import sys

import pytest

from milter_bridge.cli import main
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.commands import MtaCommand
from milter_bridge.protocol.constants import ProtocolFlag
from tests.load.fake_milter import Conversation, optneg, serving


async def load_command(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "milter_bridge", "load", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_valid_milter_exits_0_with_a_text_report() -> None:
    async with serving(optneg()) as milter:
        code, out, err = await load_command(milter.target, "--count", "20", "--marker-share", "0.5")
    assert code == 0, err
    assert "20 messages on 20 connections" in out
    assert "outcomes         eom accept 20" in out
    assert "protocol errors  0" in out
    assert "from writing MAIL FROM to the answer that decided the message" in out
    stages = "optneg|connect|helo|mail|rcpt|data|header|eoh|body|eom"
    assert re.search(rf"\n  worst answer     \d+\.\d\d ms at ({stages})\n", out)
    assert "µs/message" in out
    subjects = [
        c.value
        for conversation in milter.conversations
        for c in conversation.commands
        if isinstance(c, cmd.Header) and c.name == b"Subject"
    ]
    assert subjects.count(b"load test message REJECT") == 10


async def test_a_reply_to_an_event_without_reply_exits_1() -> None:
    def answer(command: MtaCommand, _: Conversation) -> list[r.MilterReply] | None:
        return [r.Continue()] if isinstance(command, cmd.Mail) else None

    async with serving(optneg(int(ProtocolFlag.SMFIP_NR_MAIL)), answer) as milter:
        code, out, _ = await load_command(milter.target, "--count", "5")
        await milter.all_ended()
    assert code == 1
    assert "unexpected: connection 0, message" in out
    assert "while the MTA waited for none" in out


async def test_nothing_listening_exits_1() -> None:
    async with serving(optneg()) as milter:
        target = milter.target
    code, out, _ = await load_command(target, "--count", "2", "--timeout", "5")
    assert code == 1
    assert "outcomes         connection failed 2" in out
    assert f"connection failed: {target}:" in out
    assert "worst answer     - (no answer was awaited)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tcp:x", "--count", "1"], "TARGET: 'tcp:x' is not inet:HOST:PORT"),
        (["inet:127.0.0.1:1", "--count", "0"], "--count must be at least 1"),
        (["inet:127.0.0.1:1", "--marker-share", "2"], "--marker-share must be between 0 and 1"),
        (["inet:127.0.0.1:1", "--headers", "0", "--marker-share", "0.1"], "needs at least one"),
        (["inet:127.0.0.1:1", "--recipients", "0"], "--recipients must be at least 1"),
        (["inet:127.0.0.1:1", "--concurrency", "0"], "must be at least 1"),
        (["inet:127.0.0.1:1", "--timeout", "0"], "--timeout must be a positive number"),
        (["inet:127.0.0.1:1", "--abandon-share", "3/2"], "--abandon-share must be between 0 and 1"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", *args]) == 2
    assert message in capsys.readouterr().err


async def test_abandoned_messages_in_the_text_report_exit_0() -> None:
    async with serving(optneg()) as milter:
        code, out, err = await load_command(
            milter.target, "--count", "20", "--abandon-share", "1/10", "--abandon", "rst"
        )
        await milter.all_ended()
    assert code == 0, err
    # Messages 8 and 18, at the first two points; the others are answered.
    assert "outcomes         eom accept 18, abandoned mail rst 1, abandoned rcpt rst 1" in out
    assert "(18 messages)" in out  # the latency leaves the abandoned messages out
    assert "protocol errors  0" in out
    assert len(milter.conversations) == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--abandon", "reset"], "invalid choice: 'reset'"),
        (["--abandon-share", "x"], "'x' is not a fraction such as 0.1 or 1/10"),
    ],
)
def test_abandon_flags_that_argparse_refuses(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["load", "inet:127.0.0.1:1", "--count", "1", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_count_and_duration_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["load", "inet:127.0.0.1:1", "--count", "1", "--duration", "1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_names_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "load TARGET" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["load", "--help"])
    out = capsys.readouterr().out
    assert "Postfix 3.7" in out
    assert "--messages-per-connection" in out
    assert "--abandon-share" in out
    assert "{fin,rst}" in out
