"""The Docker image without a Docker engine: the Dockerfile's shape, hadolint, and its
install script (docker/install.sh) run here into a temporary prefix, whose entrypoint
then serves, answers ``milter-bridge probe`` (the HEALTHCHECK) and stops on SIGTERM.

The script gets the same build context the Dockerfile copies and builds from it as in
the image. The tests run without a network (as root, in their own network namespace),
so pip takes the build requirements and the dependencies from the wheelhouse ./test
downloads (tests/tools.py; PIP_NO_INDEX=1, PIP_FIND_LINKS) instead of from PyPI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tools import tool, wheelhouse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"
PORT_ENV = "MILTER_BRIDGE_PORT"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{keyword} in stage {self.name or self.base}: {found}"
        return found[0]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, then the stages with their instructions (continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args, stages


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], value)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_multi_stage_build_on_a_small_python_image(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = dockerfile
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    for stage in (builder, final):
        image = expand(stage.base, args)
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image), image
    # The builder runs the install script, and only it; the final stage copies its result.
    assert builder.one("RUN") == 'sh docker/install.sh "${PREFIX}" /src'
    assert args["PREFIX"].startswith("/")
    assert "--from=builder ${PREFIX} ${PREFIX}" in final.all("COPY")
    assert final.all("RUN") == [final.one("RUN")]  # only the user is made there
    assert "useradd" in final.one("RUN")
    assert any("PATH=${PREFIX}/bin:" in env for env in final.all("ENV"))


def test_runs_as_a_non_root_user_with_the_bridge_as_entrypoint(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    final = stages[-1]
    user = final.one("USER")
    assert re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", user), "a numeric non-root uid:gid"
    assert json.loads(final.one("ENTRYPOINT")) == ["milter-bridge"]
    cmd = json.loads(final.one("CMD"))
    env = dict(word.split("=", 1) for e in final.all("ENV") for word in e.split())
    port = env[PORT_ENV]
    assert cmd[:2] == ["--listen", f"inet:0.0.0.0:{port}"]
    assert "--upstream" in cmd
    assert final.one("EXPOSE") == port


def test_healthcheck_probes_the_listening_port(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    check = stages[-1].one("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[:2] == ["sh", "-c"]
    words = shlex.split(argv[2])
    assert words[:3] == ["milter-bridge", "probe", "--connect"]
    assert words[3] == f"inet:127.0.0.1:${{{PORT_ENV}}}"
    assert words[4:] == ["||", "exit", "1"]  # Docker knows 0 and 1 only


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the install script, run for real ---------------------------------------------------


def copied_sources(stages: list[Stage]) -> list[str]:
    """What the builder stage COPYs from the build context."""
    sources: list[str] = []
    for copy in stages[0].all("COPY"):
        words = copy.split()
        assert not words[0].startswith("--"), copy
        sources += words[:-1]
    return sources


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, dockerfile: tuple[dict[str, str], list[Stage]]
) -> Path:
    """docker/install.sh run into a temporary prefix, from the build context the image gets."""
    work = tmp_path_factory.mktemp("image")
    context = work / "src"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for source in copied_sources(dockerfile[1]):
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=ignore)
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, context / source)
    prefix = work / "prefix"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
        "PYTHON": sys.executable,  # the interpreter the wheelhouse was downloaded for
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse()),
    }
    result = subprocess.run(
        ["sh", str(context / "docker" / "install.sh"), str(prefix), str(context)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


def test_install_script_makes_a_self_contained_prefix(installed: Path) -> None:
    assert os.access(installed / "bin" / "milter-bridge", os.X_OK)
    site = next((installed / "lib").glob("python3.*/site-packages"))
    names = {p.name for p in site.iterdir()}
    assert {"milter_bridge", "milter_policy"} <= names
    assert not {n for n in names if n.startswith(("pip", "setuptools"))}, names
    code = "import milter_bridge, milter_policy; print(milter_bridge.__file__)"
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=installed,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(installed.resolve())


def test_install_script_refuses_an_existing_prefix(installed: Path) -> None:
    result = subprocess.run(
        ["sh", str(INSTALL), str(installed)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "already holds" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the bridge exited: {log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    pytest.fail(f"the bridge did not listen on {port}: {log.read_text()}")


@pytest.fixture
def bridge(installed: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The installed entrypoint, as the image's CMD runs it (on loopback, a free port)."""
    port = free_port()
    log = tmp_path / "bridge.log"
    argv = [str(installed / "bin" / "milter-bridge"), "--listen", f"inet:127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--upstream", "embedded"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        wait_listening(port, proc, log)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def probe(installed: Path, port: int) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's command, with the installed entrypoint."""
    return subprocess.run(
        [str(installed / "bin" / "milter-bridge"), "probe", "--connect", f"inet:127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_installed_entrypoint_serves_answers_the_healthcheck_and_stops_on_sigterm(
    installed: Path, bridge: tuple[subprocess.Popen[bytes], int, Path]
) -> None:
    proc, port, log = bridge
    answer = probe(installed, port)
    assert answer.returncode == 0, answer.stdout + answer.stderr + log.read_text()
    assert answer.stdout.startswith("ok: ")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0, log.read_text()
    after = probe(installed, port)
    assert after.returncode == 1, "nothing listens any more: the healthcheck fails"
