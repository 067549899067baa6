"""deploy/systemd, deploy/postfix, deploy/sendmail: the unit passes ``systemd-analyze verify``
(alone and with the chrooted-Postfix drop-in), has the properties its README relies on, and
the MTA snippets give the bridge's deadlines room (MTA timeouts above them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from milter_bridge.config import (
    DEFAULT_DEADLINE,
    DEFAULT_EOM_DEADLINE,
    SENDMAIL_READ_TIMEOUT,
    Config,
)
from tests.prerequisites import require

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "milter-bridge.service"
DROP_IN = SYSTEMD / "postfix-chroot.conf"
SYSUSERS = SYSTEMD / "milter-bridge.sysusers.conf"
POSTFIX = ROOT / "deploy" / "postfix" / "main.cf.snippet"
SENDMAIL = ROOT / "deploy" / "sendmail" / "milter.mc.snippet"
BINARY = "/usr/local/bin/milter-bridge"
SOCKET_DIR = "/run/milter-bridge"
DEFAULTS = {f.name: f.default for f in fields(Config)}
GRACE_PERIOD = float(DEFAULTS["grace_period"])  # type: ignore[arg-type]
DESCRIBE_WAIT = float(DEFAULTS["describe_wait"])  # type: ignore[arg-type]
PROGRESS_INTERVAL = float(DEFAULTS["progress_interval"])  # type: ignore[arg-type]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
}


def directives(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def seconds(text: str) -> float:
    """systemd, Postfix and Sendmail time values: ``45``, ``45s``, ``5m``, ``1h``, ``1min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts, f"not a time: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def bridge_binary() -> str:
    """The milter-bridge of the interpreter running the tests (the venv's, under ./test)."""
    beside = Path(sys.executable).parent / "milter-bridge"
    found = str(beside) if beside.is_file() else shutil.which("milter-bridge")
    assert found, "milter-bridge is not installed next to this interpreter nor on PATH"
    return found


def verify(tmp_path: Path, *drop_ins: Path) -> None:
    """systemd-analyze verify on a copy whose ExecStart= names an existing milter-bridge
    (verify checks that the command is executable); drop-ins load from the copy's
    milter-bridge.service.d/ through SYSTEMD_UNIT_PATH. Needs no network and no running
    systemd. Warnings (an unknown key, a bad value) leave the exit status 0, so any
    output fails too."""
    require(commands=("systemd-analyze",))
    binary = bridge_binary()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(BINARY, binary))
    if drop_ins:
        (tmp_path / f"{UNIT.name}.d").mkdir()
        for drop_in in drop_ins:
            (tmp_path / f"{UNIT.name}.d" / drop_in.name).write_text(
                drop_in.read_text().replace(BINARY, binary)
            )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert not output, output


def test_the_folder_holds_the_unit_its_drop_in_sysusers_and_readme() -> None:
    assert {p.name for p in SYSTEMD.iterdir()} == {
        "README.md",
        UNIT.name,
        DROP_IN.name,
        SYSUSERS.name,
    }


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    verify(tmp_path)


def test_systemd_analyze_verify_passes_with_the_chroot_drop_in(tmp_path: Path) -> None:
    verify(tmp_path, DROP_IN)


def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = broken / DROP_IN.name
    bad.write_text("[Service]\nProtectSystem=sometimes\n")
    with pytest.raises(AssertionError, match="protect system value, ignoring: sometimes"):
        verify(tmp_path, bad)


def test_unit_runs_as_its_own_user_with_the_socket_in_its_runtime_directory() -> None:
    unit = directives(UNIT)
    assert unit["Service.User"] == ["milter-bridge"] or unit.get("Service.DynamicUser") == ["yes"]
    assert "u milter-bridge " in SYSUSERS.read_text()
    assert unit["Service.RuntimeDirectory"] == ["milter-bridge"]
    # Others may traverse (Postfix reaches the socket), not list; the socket is 660.
    assert unit["Service.RuntimeDirectoryMode"] == ["0711"]
    (command,) = unit["Service.ExecStart"]
    args = command.split()
    assert args[0] == BINARY
    assert args[1:] == [
        "--listen",
        f"unix:{SOCKET_DIR}/milter.sock",
        "--socket-mode",
        "660",
        "--socket-group",
        "postfix",
    ]
    # Giving the socket the group postfix needs membership of it (no capabilities).
    assert unit["Service.SupplementaryGroups"] == ["postfix"]
    assert unit["Service.EnvironmentFile"] == ["-/etc/default/milter-bridge"]


def test_unit_stops_with_sigterm_and_waits_longer_than_the_grace_period() -> None:
    unit = directives(UNIT)
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    (stop,) = unit["Service.TimeoutStopSec"]
    assert seconds(stop) > GRACE_PERIOD
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.RestartPreventExitStatus"] == ["2"]  # a bad setting


def test_unit_is_hardened() -> None:
    unit = directives(UNIT)
    for key, value in HARDENING.items():
        assert unit.get(f"Service.{key}") == [value], key
    assert "Service.AmbientCapabilities" not in unit or unit["Service.AmbientCapabilities"] == [""]
    # @privileged would forbid chown, which --socket-group needs.
    assert not any("@privileged" in v for v in unit["Service.SystemCallFilter"])


def test_chroot_drop_in_moves_the_socket_into_postfix_queue_directory() -> None:
    drop_in = directives(DROP_IN)
    assert drop_in["Service.ExecStart"][0] == ""  # resets the unit's command
    assert (
        "--listen unix:/var/spool/postfix/milter-bridge/milter.sock"
        in (drop_in["Service.ExecStart"][1])
    )
    assert drop_in["Service.ReadWritePaths"] == ["/var/spool/postfix/milter-bridge"]


def postfix_settings() -> dict[str, str]:
    out = {}
    for raw in POSTFIX.read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            key, sep, value = raw.partition("=")
            assert sep, raw
            out[key.strip()] = value.strip()
    return out


def test_postfix_snippet_tempfails_and_waits_longer_than_the_bridge() -> None:
    conf = postfix_settings()
    assert conf["smtpd_milters"] == f"unix:{SOCKET_DIR}/milter.sock"
    assert conf["non_smtpd_milters"] == "$smtpd_milters"
    assert conf["milter_protocol"] == "6"
    assert conf["milter_default_action"] == "tempfail"
    # The bridge answers (with its failure action and a log line saying why) before
    # Postfix gives up on it: negotiation waits at most --describe-wait for capabilities.
    assert seconds(conf["milter_connect_timeout"]) > DESCRIBE_WAIT
    assert seconds(conf["milter_command_timeout"]) > DEFAULT_DEADLINE
    assert seconds(conf["milter_content_timeout"]) > DEFAULT_EOM_DEADLINE


def test_sendmail_snippet_tempfails_and_waits_longer_than_the_bridge() -> None:
    text = SENDMAIL.read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("INPUT_MAIL_FILTER(")]
    match = re.fullmatch(r"INPUT_MAIL_FILTER\(`bridge', `(?P<fields>[^']*)'\)", line)
    assert match, line
    fields_ = dict(f.strip().split("=", 1) for f in match["fields"].split(", "))
    assert fields_["S"] == f"unix:{SOCKET_DIR}/milter.sock"
    assert fields_["F"] == "T"
    timeouts = {k: seconds(v) for k, v in (t.split(":") for t in fields_["T"].split(";"))}
    assert set(timeouts) == {"C", "S", "R", "E"}
    assert timeouts["R"] == SENDMAIL_READ_TIMEOUT
    assert timeouts["R"] > DEFAULT_DEADLINE
    assert timeouts["R"] > PROGRESS_INTERVAL
    assert timeouts["E"] > DEFAULT_EOM_DEADLINE
