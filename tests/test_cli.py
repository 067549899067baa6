"""The milter-bridge command: --version, --explain, --help, and how it runs the event loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from milter_bridge import cli
from milter_bridge.cli import main
from milter_bridge.config import Config, parse_listen
from milter_bridge.v1 import policy_pb2 as pb
from tests.session.harness import eom_only


def write(tmp_path: Path, message: pb.DescribeResponse | pb.Capabilities) -> Path:
    path = tmp_path / "caps.json"
    path.write_text(json_format.MessageToJson(message))
    return path


def test_explain_an_end_of_message_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, pb.DescribeResponse(capabilities=eom_only(), fingerprint="v1"))
    assert main(["--explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "protocol: 0x8F3C0" in out
    assert "event data            SKIP     not sent by the MTA" in out
    assert "event rcpt_to         SKIP     sent, the MTA does not wait" in out
    assert "event end_of_message  DECIDE   sent, the MTA waits for the policy" in out


def test_explain_bare_capabilities_against_version_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, eom_only())
    assert main(["--explain", str(path), "--offer", "postfix-v2"]) == 0
    assert "version:  2\n" in capsys.readouterr().out


def test_invalid_capabilities_say_which_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, pb.Capabilities(events=pb.EventModes(connect=pb.EVENT_MODE_DECIDE)))
    assert main(["--explain", str(path)]) == 2
    assert "events.helo is EVENT_MODE_UNSPECIFIED" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [Path(sys.executable).parent / "milter-bridge", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("milter-bridge ")


def test_help_shows_each_default() -> None:
    text = " ".join(cli._parser().format_help().split())
    assert "(default: 8,end_of_message=120) [MILTER_BRIDGE_DEADLINE]" in text
    assert "(default: 1000) [MILTER_BRIDGE_MAX_RECIPIENTS]" in text


# The bridge's own main() in a process without uvloop, its serve() replaced by one
# that logs an exception raised in the loop, as the bridge would log a bug.
LOGS_A_TRACEBACK = """
import logging, sys
sys.modules["uvloop"] = None  # import uvloop fails, as where it is not installed
from milter_bridge import cli

async def serve(config):
    try:
        raise RuntimeError("raised in the served loop")
    except RuntimeError:
        logging.getLogger("milter_bridge").exception("logged in the served loop")

cli.serve = serve
sys.exit(cli.main(sys.argv[1:]))
"""


def test_tracebacks_logged_in_the_served_loop_do_not_mention_uvloop() -> None:
    argv = ["--listen", "inet:127.0.0.1:1", "--upstream", "p:1"]
    result = subprocess.run(
        [sys.executable, "-c", LOGS_A_TRACEBACK, *argv],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RuntimeError: raised in the served loop" in result.stderr
    assert "uvloop" not in result.stderr, result.stderr
    assert "During handling of the above exception" not in result.stderr


def test_exceptions_in_the_served_loop_have_no_import_error_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # the asyncio.run fallback
    raised: list[BaseException] = []

    async def serve(config: Config) -> None:
        try:
            raise RuntimeError
        except RuntimeError as exc:
            raised.append(exc)

    monkeypatch.setattr(cli, "serve", serve)
    cli._run(Config(listen=parse_listen("inet:127.0.0.1:1"), upstream="p:1"))
    (exc,) = raised
    assert exc.__context__ is None
