"""A self-contained Postfix 3.7 for tests: its own config, queue and data directories.

smtpd listens on 127.0.0.1, filters through the milter given, and relays every
accepted message to a sink on loopback. Pitfalls handled (see
../shared/mta/README.md): Postfix's master must start as root; the data
directory must belong to the postfix user; no chroot; no DNS; an explicit
myhostname; maillog_file because there is no syslog; restart, never reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import subprocess
from pathlib import Path

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.example.test
mydomain = example.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:5.1.1 local delivery disabled in test instance
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {base}/log/maillog
maillog_file_prefixes = {base}/log
biff = no
delay_warning_time = 0
smtpd_milters = {milter}
non_smtpd_milters = {milter}
milter_protocol = 6
milter_default_action = tempfail
milter_connect_timeout = 10s
milter_command_timeout = 30s
milter_content_timeout = 300s
"""

# No chroot (5th column n): unix: milter sockets and /etc files just work.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n  -  n  60   1  pickup
cleanup   unix  n  -  n  -    0  cleanup
qmgr      unix  n  -  n  300  1  qmgr
rewrite   unix  -  -  n  -    -  trivial-rewrite
bounce    unix  -  -  n  -    0  bounce
defer     unix  -  -  n  -    0  bounce
trace     unix  -  -  n  -    0  bounce
verify    unix  -  -  n  -    1  verify
flush     unix  n  -  n  1000? 0 flush
proxymap  unix  -  -  n  -    -  proxymap
proxywrite unix -  -  n  -    1  proxymap
smtp      unix  -  -  n  -    -  smtp
relay     unix  -  -  n  -    -  smtp
showq     unix  n  -  n  -    -  showq
error     unix  -  -  n  -    -  error
retry     unix  -  -  n  -    -  error
discard   unix  -  -  n  -    -  discard
anvil     unix  -  -  n  -    1  anvil
scache    unix  -  -  n  -    1  scache
postlog   unix-dgram n - n - 1 postlogd
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postfix:
    def __init__(self, base: Path, milter: str, sink_port: int) -> None:
        self.base = base
        self.milter = milter
        self.sink_port = sink_port
        self.port = free_port()

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.base / "etc"), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    async def start(self) -> None:
        for sub in ("etc", "queue", "data", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chown(self.base / "data", pwd.getpwnam("postfix").pw_uid, -1)
        values = {"base": self.base, "sink_port": self.sink_port, "milter": self.milter}
        (self.base / "etc" / "main.cf").write_text(MAIN_CF.format(**values))
        (self.base / "etc" / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self._postfix("check")  # also creates the queue directories
        started = await asyncio.to_thread(self._postfix, "start")
        if started.returncode != 0:
            msg = f"postfix start failed: {started.stdout}{started.stderr}\n{self.log()}"
            raise RuntimeError(msg)
        await self._wait_for_port()

    async def _wait_for_port(self) -> None:
        """Readiness: master listens on the smtpd port (without opening an SMTP session)."""
        for _ in range(500):
            hex_port = f":{self.port:04X} "
            if any(
                hex_port in line and line.split()[3] == "0A"
                for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            ):
                return
            await asyncio.sleep(0.02)
        msg = f"postfix did not listen on {self.port}\n{self.log()}"
        raise RuntimeError(msg)

    async def stop(self) -> None:
        pid_file = self.base / "queue" / "pid" / "master.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().strip())
        await asyncio.to_thread(self._postfix, "stop")
        for _ in range(250):  # the master we started, by its pid
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)

    def queue(self) -> list[dict[str, object]]:
        """The messages in this instance's queues (postqueue -j), e.g. queue_name "hold"."""
        result = subprocess.run(
            ["postqueue", "-c", str(self.base / "etc"), "-j"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def log(self) -> str:
        path = self.base / "log" / "maillog"
        return path.read_text() if path.exists() else "(no maillog)"
