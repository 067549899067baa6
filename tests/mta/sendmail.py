"""A self-contained Sendmail 8.17 for tests: Debian's binaries unpacked, never installed.

sendmail-bin conflicts with the installed postfix (both are the
mail-transport-agent), so `ensure_sendmail()` fetches the .debs with
`apt-get download` and unpacks them with `dpkg-deb -x` into a cache directory
(once; later calls only check). `Sendmail` then runs `sendmail -bD` (daemon in
the foreground: its pid is ours) on 127.0.0.1 with its own .cf, filtering
through the milter given and relaying every accepted message to a sink.

Pitfalls handled (see ../shared/mta/README.md):
  * Sendmail resolves its own host name at start and sleeps 60 s when it
    cannot. It runs under `unshare --uts --mount` (not --net: it shares the test
    run's loopback-only network namespace, see tests/conftest.py) with an FQDN
    host name and a private /etc/hosts bind-mounted over the real one.
  * There is no syslog. In the same mount namespace a tmpfs covers /dev (the
    few device nodes Sendmail needs are bind-mounted back) and /dev/log is a
    datagram socket this process reads: `log()` has Sendmail's own log lines.
  * libwrap.so.0 comes from the unpacked tree via LD_LIBRARY_PATH, so the
    binary's setgid bit is removed (a setgid exec ignores LD_LIBRARY_PATH).
  * DontBlameSendmail=TrustStickyBit: unix: milter sockets under /tmp work.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.mta.postfix import free_port

DEFAULT_ROOT = Path("/var/tmp/milter-bridge-sendmail")
ROOT_ENV = "MILTER_BRIDGE_SENDMAIL_ROOT"
FQDN = "sm.example.test"
# m4 only when the machine has none (it builds the .cf); libwrap0: a runtime
# dependency of sendmail-bin that a stock Debian 12 lacks.
PACKAGES = ("sendmail-bin", "sendmail-base", "sendmail-cf", "libwrap0", "m4")


@dataclass(frozen=True)
class SendmailTree:
    """Debian's sendmail packages unpacked under `root`."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "usr/libexec/sendmail/sendmail"

    @property
    def cf_dir(self) -> Path:
        return self.root / "usr/share/sendmail/cf"

    @property
    def lib_dir(self) -> Path:
        return self.root / "usr/lib/x86_64-linux-gnu"

    @property
    def m4(self) -> Path:
        system = shutil.which("m4")
        return Path(system) if system else self.root / "usr/bin/m4"

    @property
    def version(self) -> str:
        marker = _marker(self.root, "sendmail-bin")
        return marker.read_text().split("_")[1] if marker.exists() else "?"


def _marker(root: Path, package: str) -> Path:
    """Written once `package` is completely unpacked under root; holds the .deb's name."""
    return root / ".unpacked" / package


def sendmail_cache() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _missing(root: Path) -> list[str]:
    def present(package: str) -> bool:
        if package == "m4" and shutil.which("m4"):
            return True
        return _marker(root, package).exists()

    return [p for p in PACKAGES if not present(p)]


def unpacked_sendmail(cache: Path | None = None) -> SendmailTree | None:
    """The unpacked tree if it is complete (no download: tests run without a network)."""
    tree = SendmailTree((cache or sendmail_cache()) / "root")
    return None if _missing(tree.root) else tree


def ensure_sendmail(cache: Path | None = None) -> SendmailTree:
    """Fetch and unpack what is missing into cache/root (idempotent; safe to run concurrently).

    Needs the network and apt's package lists (`apt-get update`) when something is
    missing, so it runs before the tests (`python -m tests.mta.sendmail`, as .ci/run
    does): a root test run has no network (tests/conftest.py).
    """
    cache = cache or sendmail_cache()
    tree = SendmailTree(cache / "root")
    if not _missing(tree.root):
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = _missing(tree.root)
        if not missing:
            return tree
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download:
            got = subprocess.run(
                ["apt-get", "download", *missing],
                cwd=download,
                capture_output=True,
                text=True,
                check=False,
                timeout=300,
            )
            if got.returncode != 0:
                msg = (
                    f"apt-get download {' '.join(missing)} failed (did `apt-get update` run?):\n"
                    f"{got.stdout}{got.stderr}"
                )
                raise RuntimeError(msg)
            (tree.root / ".unpacked").mkdir(parents=True, exist_ok=True)
            for deb in sorted(Path(download).glob("*.deb")):
                subprocess.run(
                    ["dpkg-deb", "-x", str(deb), str(tree.root)], check=True, timeout=120
                )
                if deb.name.startswith("sendmail-bin_"):
                    # A setgid exec ignores LD_LIBRARY_PATH (which finds libwrap.so.0).
                    tree.binary.chmod(tree.binary.stat().st_mode & 0o1777)
                _marker(tree.root, deb.name.split("_")[0]).write_text(deb.name)
                deb.replace(debs / deb.name)
        if still := _missing(tree.root):
            msg = f"unpacked the sendmail packages but still missing: {still}"
            raise RuntimeError(msg)
    return tree


MC = """\
divert(-1)
# milter-bridge test instance: daemon on 127.0.0.1:{port}, milter "bridge",
# every message relayed (ESMTP) to the sink on 127.0.0.1:{sink_port}.
divert(0)dnl
VERSIONID(`milter-bridge test instance')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{fqdn}')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
# Headers up to 256 KB in all (default 32 KB), as sites that expect large headers set it.
define(`confMAX_HEADERS_LENGTH', `262144')dnl
define(`confSERVICE_SWITCH_FILE', `{base}/service.switch')dnl
define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl
define(`QUEUE_DIR', `{base}/queue')dnl
define(`STATUS_FILE', `{base}/statistics')dnl
define(`HELP_FILE', `{base}/helpfile')dnl
define(`confPID_FILE', `{base}/sendmail.pid')dnl
define(`ALIAS_FILE', `')dnl
define(`confCW_FILE', `-o {base}/local-host-names')dnl
define(`confTO_IDENT', `0s')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`confLOG_LEVEL', `14')dnl
define(`confMILTER_LOG_LEVEL', `14')dnl
define(`confDELIVERY_MODE', `interactive')dnl
define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`promiscuous_relay')dnl
DAEMON_OPTIONS(`Family=inet, Addr=127.0.0.1, Port={port}, Name=MTA')dnl
INPUT_MAIL_FILTER(`bridge', `S={milter}, F=T, T=C:10s;S:10s;R:10s;E:5m')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""

# Runs as `unshare --uts --mount -- sh -c NAMESPACE_SETUP sh BASE SENDMAIL ARGS...`: sets up
# the private host name, /etc/hosts and /dev (with /dev/log = our socket), then becomes
# Sendmail (exec: the pid the test started is the daemon's).
NAMESPACE_SETUP = """\
set -eu
base=$1; shift
hostname {fqdn}
mount --bind "$base/hosts" /etc/hosts
mount --rbind /dev "$base/host-dev"
mount -t tmpfs -o mode=0755,size=64k sendmail-dev /dev
for node in null zero full random urandom tty; do
    : > "/dev/$node"; mount --bind "$base/host-dev/$node" "/dev/$node"
done
ln -s /proc/self/fd /dev/fd
for fd in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${{fd%:*}}" "/dev/${{fd#*:}}"; done
: > /dev/log; mount --bind "$base/syslog.sock" /dev/log
umount -l "$base/host-dev"
exec "$@"
"""


class Sendmail:
    """`sendmail -bD` on 127.0.0.1:port with INPUT_MAIL_FILTER `milter` (Sendmail syntax:
    inet:PORT@127.0.0.1 or unix:/path), relaying to 127.0.0.1:sink_port.

    `base` must be world-traversable (as for Postfix) and is this instance's alone.
    """

    def __init__(
        self, base: Path, milter: str, sink_port: int, tree: SendmailTree | None = None
    ) -> None:
        self.base = base
        self.milter = milter
        self.sink_port = sink_port
        self.tree = tree
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.syslog: list[str] = []
        self._syslog_socket: socket.socket | None = None
        self._mount_ns = ""

    @property
    def cf(self) -> Path:
        return self.base / "sendmail.cf"

    @property
    def env(self) -> dict[str, str]:
        assert self.tree is not None
        return {**os.environ, "LD_LIBRARY_PATH": str(self.tree.lib_dir)}

    def _build_cf(self) -> None:
        assert self.tree is not None
        for sub in ("queue", "host-dev"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "queue").chmod(0o700)
        for name in ("helpfile", "local-host-names", "statistics"):
            (self.base / name).write_text("")
        (self.base / "service.switch").write_text("hosts files\naliases files\n")
        (self.base / "hosts").write_text(f"127.0.0.1 localhost {FQDN}\n::1 localhost {FQDN}\n")
        mc = self.base / "sendmail.mc"
        values = {"fqdn": FQDN, "base": self.base, "port": self.port, "milter": self.milter}
        mc.write_text(MC.format(sink_port=self.sink_port, **values))
        cf_dir = self.tree.cf_dir
        built = subprocess.run(
            [str(self.tree.m4), f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4/cf.m4"), str(mc)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if built.returncode != 0:
            msg = f"m4 failed to build the .cf: {built.stderr}"
            raise RuntimeError(msg)
        self.cf.write_text(built.stdout)

    def _listen_syslog(self) -> None:
        path = self.base / "syslog.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        path.chmod(0o666)
        self._syslog_socket = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read_syslog)

    def _read_syslog(self) -> None:
        assert self._syslog_socket is not None
        with contextlib.suppress(BlockingIOError):
            while True:
                datagram = self._syslog_socket.recv(65536)
                # "<PRI>Mon DD HH:MM:SS sm-mta[pid]: text": drop the priority.
                line = datagram.decode("utf-8", "replace").rstrip("\x00\n")
                self.syslog.append(re.sub(r"^<\d+>", "", line))

    async def start(self) -> None:
        if self.tree is None:
            self.tree = unpacked_sendmail()
        if self.tree is None:
            msg = f"Sendmail is not unpacked in {sendmail_cache()}: python -m tests.mta.sendmail"
            raise RuntimeError(msg)
        await asyncio.to_thread(self._build_cf)
        self._listen_syslog()
        command = [
            "unshare",
            "--uts",
            "--mount",
            "--",
            "sh",
            "-c",
            NAMESPACE_SETUP.format(fqdn=FQDN),
            "sh",
            str(self.base),
            str(self.tree.binary),
            "-C",
            str(self.cf),
            "-bD",  # daemon in the foreground: this pid is the daemon's
            "-X",
            str(self.base / "smtp-trace.log"),
        ]
        with (self.base / "daemon.out").open("wb") as out:
            self.process = subprocess.Popen(
                command, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        await self._wait_for_port()
        self._mount_ns = str(Path(f"/proc/{self.process.pid}/ns/mnt").readlink())

    async def _wait_for_port(self) -> None:
        """Readiness: the daemon listens (without opening an SMTP session)."""
        assert self.process is not None
        hex_port = f"0100007F:{self.port:04X} "
        for _ in range(1000):
            if any(
                hex_port in line and line.split()[3] == "0A"
                for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            ):
                return
            if self.process.poll() is not None:
                break
            await asyncio.sleep(0.02)
        msg = f"sendmail did not listen on {self.port}\n{self.log()}"
        raise RuntimeError(msg)

    def _namespace_pids(self) -> list[int]:
        """Live processes in this instance's mount namespace: the daemon and its children.

        (A zombie has no namespaces left, so it is not listed.)"""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if str((entry / "ns/mnt").readlink()) == self._mount_ns:
                        pids.append(int(entry.name))
        return pids

    async def stop(self) -> None:
        """Sessions first (the daemon reaps them), then the daemon; by pid, SIGKILL if slow."""
        if self._syslog_socket is not None:
            self._read_syslog()
            asyncio.get_running_loop().remove_reader(self._syslog_socket.fileno())
            self._syslog_socket.close()
            self._syslog_socket = None
        if self.process is None:
            return
        process, self.process = self.process, None
        if self._mount_ns and process.poll() is None:
            children = [pid for pid in self._namespace_pids() if pid != process.pid]
            await self._end(children, signal.SIGTERM)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            for _ in range(250):
                if process.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            else:
                process.kill()
                await asyncio.to_thread(process.wait, 10)
        if self._mount_ns and (left := self._namespace_pids()):
            await self._end(left, signal.SIGKILL)
            if left := self._namespace_pids():
                msg = f"sendmail processes survived SIGKILL: {left}"
                raise RuntimeError(msg)

    async def _end(self, pids: list[int], sig: signal.Signals) -> None:
        """Signal these pids and wait (bounded) until none is alive; SIGKILL stragglers."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(250):
            alive = set(pids) & set(self._namespace_pids())
            if not alive:
                return
            await asyncio.sleep(0.02)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(250):
            if not set(pids) & set(self._namespace_pids()):
                return
            await asyncio.sleep(0.02)

    def log(self) -> str:
        """Sendmail's syslog lines, its stdout/stderr and its -X SMTP trace (in and out)."""
        if self._syslog_socket is not None:
            self._read_syslog()  # what arrived since the event loop last ran
        parts = ["--- syslog (/dev/log) ---", *self.syslog]
        for name, title in (("daemon.out", "stdout/stderr"), ("smtp-trace.log", "-X trace")):
            path = self.base / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            parts += [f"--- {title} ({name}) ---", text.rstrip("\n")]
        return "\n".join(parts) + "\n"

    async def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run this instance's sendmail binary with its .cf in the daemon's namespaces."""
        assert self.process is not None
        assert self.tree is not None
        command = ["nsenter", f"--target={self.process.pid}", "--uts", "--mount", "--"]
        return await asyncio.to_thread(
            subprocess.run,
            [*command, str(self.tree.binary), "-C", str(self.cf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    async def quarantine_listing(self) -> str:
        """`mailq -qQ` for this instance: the quarantined messages, as Sendmail prints them."""
        listed = await self.run("-bp", "-qQ")
        if listed.returncode != 0:
            msg = f"sendmail -bp -qQ failed: {listed.stdout}{listed.stderr}"
            raise RuntimeError(msg)
        return listed.stdout

    async def quarantined(self) -> dict[str, str]:
        """Queue id -> quarantine reason of every quarantined message."""
        found: dict[str, str] = {}
        queue_id = ""
        for line in (await self.quarantine_listing()).splitlines():
            if match := re.match(r"^(\w{14,})\*?\s", line):
                queue_id = match[1]
            elif (match := re.match(r"^\s+QUARANTINE:\s*(.*)$", line)) and queue_id:
                found[queue_id] = match[1]
        return found


if __name__ == "__main__":
    fetched = ensure_sendmail()
    print(f"sendmail {fetched.version} unpacked in {fetched.root}")
