"""Settings: flags, MILTER_BRIDGE_* environment, TOML file; precedence; errors naming the source."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from milter_bridge import settings
from milter_bridge.cli import _parser, config_from, load_settings
from milter_bridge.config import Config, ConfigError, parse_listen
from milter_bridge.options import Setting
from milter_bridge.settings import BY_NAME, SETTINGS, Loaded

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

# A valid value per setting, as text (flag/env) and as TOML.
SAMPLES: dict[str, tuple[str, str]] = {
    "listen": ("inet:127.0.0.1:9999", '"inet:127.0.0.1:9999"'),
    "upstream": ("policy:50051", '"policy:50051"'),
    "socket_mode": ("640", '"640"'),
    "socket_group": ("root", '"root"'),
    "max_connections": ("77", "77"),
    "workers": ("3", "3"),
    "deadline": ("helo=3", '["helo=3"]'),
    "failure_action": ("connect=accept", '{ connect = "accept" }'),
    "describe_wait": ("1.5", "1.5"),
    "describe_refresh": ("40", "40"),
    "progress_interval": ("4", "4"),
    "grace_period": ("12", "12"),
    "max_packet_size": ("4096", "4096"),
    "max_body_buffer": ("8192", "8192"),
    "max_header_buffer": ("2048", "2048"),
    "max_headers": ("50", "50"),
    "max_recipients": ("60", "60"),
    "policy_streams": ("8", "8"),
    "policy_stream_lifetime": ("12.5", "12.5"),
    "max_recipient_buffer": ("4096", "4096"),
    "mta_idle_timeout": ("60", "60"),
    "log_level": ("debug", '"debug"'),
    "log_format": ("json", '"json"'),
    "metrics_listen": ("127.0.0.1:9890", '"127.0.0.1:9890"'),
    # {ca}, {cert}, {key}, {token}: files the test makes (the settings check them at start).
    "upstream_tls": ("on", '"on"'),
    "upstream_ca": ("{ca}", '"{ca}"'),
    "upstream_cert": ("{cert}", '"{cert}"'),
    "upstream_key": ("{key}", '"{key}"'),
    "upstream_server_name": ("policy.example", '"policy.example"'),
    "upstream_token_file": ("{token}", '"{token}"'),
}
# Settings that are valid only with another one.
COMPANIONS = {
    "upstream_cert": ["--upstream-key", "{key}"],
    "upstream_key": ["--upstream-cert", "{cert}"],
    "upstream_server_name": ["--upstream-tls", "on"],
}
NOT_PEM = str(Path(__file__).resolve())  # a readable file that is no certificate
REQUIRED = ["--listen", "inet:127.0.0.1:1", "--upstream", "p:1"]


def loaded(argv: list[str], environ: dict[str, str]) -> Loaded:
    return load_settings(_parser().parse_args(argv), environ)


@pytest.fixture(scope="module")
def security_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One CA, certificate, key and token file for every case that names one."""
    directory = tmp_path_factory.mktemp("security")
    ca = trustme.CA()
    leaf = ca.issue_cert("policy.example")
    files = {
        "ca": ca.cert_pem.bytes(),
        "cert": leaf.cert_chain_pems[0].bytes(),
        "key": leaf.private_key_pem.bytes(),
        "token": b"token\n",
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: str(directory / name) for name in files}


def fill(sample: str, files: dict[str, str]) -> str:
    for name, path in files.items():
        sample = sample.replace("{" + name + "}", path)
    return sample


def test_every_setting_has_a_sample() -> None:
    assert set(SAMPLES) == set(BY_NAME)


@pytest.mark.parametrize("name", sorted(BY_NAME))
@pytest.mark.parametrize("way", ["flag", "env", "file"])
def test_every_setting_three_ways(
    name: str, way: str, tmp_path: Path, security_files: dict[str, str]
) -> None:
    setting = BY_NAME[name]
    files = security_files
    text, toml = (fill(v, files) for v in SAMPLES[name])
    argv = list(REQUIRED) if name not in ("listen", "upstream") else []
    argv += [fill(a, files) for a in COMPANIONS.get(name, [])]
    if name == "listen":
        argv = ["--upstream", "p:1"]
    if name == "upstream":
        argv = ["--listen", "inet:127.0.0.1:1"]
    environ: dict[str, str] = {}
    if way == "flag":
        argv += [setting.flag, text]
    elif way == "env":
        environ[setting.env] = text
    else:
        file = tmp_path / "bridge.toml"
        file.write_text(f"{name} = {toml}\n")
        argv += ["--config", str(file)]
    result = loaded(argv, environ)
    assert result.sources[name].startswith(
        {"flag": "flag", "env": "env", "file": "config file"}[way]
    )
    config_from(result)  # valid


@pytest.mark.parametrize("way", ["flag", "env"])
def test_workers_auto_is_the_cores_this_process_may_use(way: str) -> None:
    argv, environ = list(REQUIRED), {}
    if way == "flag":
        argv += ["--workers", "auto"]
    else:
        environ["MILTER_BRIDGE_WORKERS"] = "auto"
    config = config_from(loaded(argv, environ))
    assert config.workers == min(len(os.sched_getaffinity(0)), 64)


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "bridge.toml"
    file.write_text(
        'listen = "inet:127.0.0.1:1"\nupstream = "file:1"\nmax_connections = 3\ngrace_period = 7\n'
    )
    environ = {"MILTER_BRIDGE_UPSTREAM": "env:1", "MILTER_BRIDGE_MAX_CONNECTIONS": "4"}
    result = loaded(["--config", str(file), "--max-connections", "5"], environ)
    config = config_from(result)
    assert config.max_connections == 5  # flag
    assert config.upstream == "env:1"  # environment
    assert config.grace_period == 7  # file
    assert config.describe_wait == 2.0  # default


@pytest.mark.parametrize(
    ("argv", "environ", "file", "message"),
    [
        (
            REQUIRED,
            {"MILTER_BRIDGE_MAX_CONNECTIONS": "lots"},
            None,
            "MILTER_BRIDGE_MAX_CONNECTIONS: 'lots' is not a whole number",
        ),
        (
            REQUIRED,
            {"MILTER_BRIDGE_DEADLINE": "eom=3"},
            None,
            "MILTER_BRIDGE_DEADLINE: unknown stage 'eom'",
        ),
        (
            REQUIRED,
            {"MILTER_BRIDGE_GRACE_PERIOD": "-1"},
            None,
            "MILTER_BRIDGE_GRACE_PERIOD: -1.0 is not a number of seconds",
        ),
        (REQUIRED, {}, "colour = 1\n", "unknown setting 'colour'"),
        (REQUIRED, {}, "max_connections = [1\n", "not valid TOML"),
        (
            REQUIRED,
            {},
            'max_connections = "many"\n',
            "max_connections: 'many' is not a whole number",
        ),
        (REQUIRED, {}, "progress_interval = 20\n", ": progress_interval: 20s is too long"),
        (["--upstream", "p:1"], {}, None, "--listen: required"),
        (
            REQUIRED,
            {"MILTER_BRIDGE_LOG_LEVEL": "loud"},
            None,
            "MILTER_BRIDGE_LOG_LEVEL: 'loud' is not one of",
        ),
        ([*REQUIRED, "--metrics-listen", "9890"], {}, None, "--metrics-listen: '9890' is not"),
        (
            REQUIRED,
            {"MILTER_BRIDGE_UPSTREAM_CERT": NOT_PEM},
            None,
            "MILTER_BRIDGE_UPSTREAM_CERT: mutual TLS needs --upstream-key too",
        ),
        ([*REQUIRED, "--upstream-ca", NOT_PEM], {}, None, "holds no PEM certificate"),
        (
            REQUIRED,
            {},
            'upstream_token_file = "/nonexistent/token"\n',
            ": upstream_token_file: cannot read /nonexistent/token: No such file",
        ),
    ],
    ids=[
        "env-int",
        "env-stage",
        "env-negative",
        "file-unknown",
        "file-syntax",
        "file-type",
        "file-range",
        "missing",
        "env-choice",
        "flag-metrics-address",
        "env-cert-without-key",
        "flag-ca-not-pem",
        "file-token-missing",
    ],
)
def test_bad_configuration_names_the_setting(
    argv: list[str], environ: dict[str, str], file: str | None, message: str, tmp_path: Path
) -> None:
    if file is not None:
        path = tmp_path / "bridge.toml"
        path.write_text(file)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        config_from(loaded(argv, environ))


def test_check_config_command(tmp_path: Path) -> None:
    file = tmp_path / "bridge.toml"
    file.write_text('listen = "inet:127.0.0.1:1"\nupstream = "p:1"\n')
    good = subprocess.run(
        [sys.executable, "-m", "milter_bridge", "check-config", "--config", str(file)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert f"listen = 'inet:127.0.0.1:1'  (config file {file})" in good.stdout
    assert "configuration is valid" in good.stdout
    # Values not given are Config's defaults, shown as one would write them.
    assert "deadline = '8,end_of_message=120'  (default)" in good.stdout
    assert "max_recipients = 1000  (default)" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "milter_bridge", "check-config", "--config", str(file)],
        capture_output=True, text=True, check=False, timeout=60,
        env={"MILTER_BRIDGE_MAX_PACKET_SIZE": "0", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert bad.returncode == 2
    assert "MILTER_BRIDGE_MAX_PACKET_SIZE: 0 must be greater than 0" in bad.stderr


def reference_row(setting: Setting) -> str:
    default = setting.shown_default
    shown = "—" if default is None else f"`{default}`"
    return f"| `{setting.flag}` | `{setting.env}` | `{setting.name}` | {shown} | {setting.help} |"


def test_reference_table_lists_every_setting() -> None:
    text = DOCS.read_text()
    for setting in SETTINGS:
        assert f"`{setting.flag}`" in text, setting.name
        assert f"`{setting.env}`" in text, setting.name
    # Row by row, with the default and help Config declares, in Config's order.
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    assert rows == [reference_row(s) for s in SETTINGS]


def differences(a: Config, b: Config) -> list[str]:
    return [f.name for f in fields(Config) if getattr(a, f.name) != getattr(b, f.name)]


def test_the_command_line_defaults_are_configs_defaults() -> None:
    """What the program runs with when only --listen and --upstream are given is what
    ``Config(listen=..., upstream=...)`` holds: the tests' bridges run the program's."""
    from_cli = config_from(loaded(REQUIRED, {}))
    direct = Config(listen=parse_listen("inet:127.0.0.1:1"), upstream="p:1")
    assert differences(from_cli, direct) == []
    assert {f.name for f in fields(Config)} == {s.field for s in SETTINGS}


@pytest.mark.parametrize("name", sorted(set(BY_NAME) - {"listen", "upstream"}))
def test_the_comparison_sees_every_setting(name: str, security_files: dict[str, str]) -> None:
    """A value other than the default shows in ``differences``, whichever setting it is."""
    setting = BY_NAME[name]
    argv = [fill(a, security_files) for a in [*COMPANIONS.get(name, []), setting.flag]]
    given = config_from(loaded([*REQUIRED, *argv, fill(SAMPLES[name][0], security_files)], {}))
    assert setting.field in differences(given, config_from(loaded(REQUIRED, {})))


def test_a_second_default_in_the_loading_path_would_be_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bug this guards against: the loader filling in a default of its own."""
    invented = replace(BY_NAME["max_headers"], required=True, parse=lambda raw: 999)
    patched = tuple(invented if s.name == "max_headers" else s for s in SETTINGS)
    monkeypatch.setattr(settings, "SETTINGS", patched)
    from_cli = config_from(loaded(REQUIRED, {}))
    direct = Config(listen=parse_listen("inet:127.0.0.1:1"), upstream="p:1")
    assert differences(from_cli, direct) == ["max_headers"]


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("max_headers", "--max-headers"),
        ("max_header_buffer", "--max-header-buffer"),
        ("max_recipients", "--max-recipients"),
        ("max_recipient_buffer", "--max-recipient-buffer"),
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_message_limits_must_be_positive(field: str, flag: str, value: int) -> None:
    listen = parse_listen("inet:127.0.0.1:1")
    limit: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=f"^{flag}: {value} must be greater than 0"):
        Config(listen=listen, upstream="p:1", **limit)
    env = BY_NAME[field].env
    with pytest.raises(ConfigError, match=f"^{env}: {value} must be greater than 0"):
        config_from(loaded(REQUIRED, {env: str(value)}))


@pytest.mark.parametrize("value", [-1, 65])
def test_policy_streams_between_0_and_64(value: int) -> None:
    listen = parse_listen("inet:127.0.0.1:1")
    with pytest.raises(ConfigError, match=f"^--policy-streams: {value} is not between 0 and 64"):
        Config(listen=listen, upstream="p:1", policy_streams=value)
    assert Config(listen=listen, upstream="p:1").policy_streams == 4  # shared by default
    assert Config(listen=listen, upstream="p:1", policy_streams=0).policy_streams == 0


@pytest.mark.parametrize("value", ["0", "-3"])
def test_policy_stream_lifetime_must_be_positive(value: str) -> None:
    env = "MILTER_BRIDGE_POLICY_STREAM_LIFETIME"
    with pytest.raises(ConfigError, match=f"^{env}: {float(value)} must be greater than 0"):
        config_from(loaded(REQUIRED, {env: value}))


def test_recipient_limits_default_like_the_header_limits() -> None:
    config = Config(listen=parse_listen("inet:127.0.0.1:1"), upstream="p:1")
    assert config.max_recipients == 1000
    assert config.max_recipient_buffer == 1 << 20


def test_the_documented_toml_example_uses_only_known_settings() -> None:
    import re  # noqa: PLC0415
    import tomllib  # noqa: PLC0415

    (block,) = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert set(tomllib.loads(block)) <= set(BY_NAME)
