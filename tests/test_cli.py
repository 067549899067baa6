"""The milter-bridge command: --version and --explain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from milter_bridge.cli import main
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
