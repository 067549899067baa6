#!/usr/bin/python3
"""Capture golden milter-protocol fixtures from REAL peers.

    /usr/bin/python3 tools/capture/capture.py --out tests/fixtures/captured
        [--only postfix|sendmail|miltertest ...]

What it does: starts the reference milter (reference_milter.py = libmilter via pymilter) in three
modes, puts a recording proxy (recording_proxy.py) in front of each, drives real MTAs through the
proxies and writes one JSON file per milter connection into --out (format: see
tests/fixtures/captured/README.md), then refreshes the generated part of that README
(fixture_coverage.py). Everything runs inside private network/UTS/mount namespaces (`unshare`)
with only `lo` up, a private /etc/hosts and the host name capture.example.test: no packet can
leave the machine and no DNS query can be answered. Files of the selected groups are (re)created;
files of other groups are left alone.

Prerequisites (Debian 12):
  * root (Postfix's master refuses otherwise; unshare; bind-mount of /etc/hosts)
  * apt packages: postfix (3.7, preseeded "No configuration": no system instance is used),
    python3-milter (pymilter 1.0.5 = libmilter 8.17), miltertest (OpenDKIM), iproute2,
    util-linux (unshare); this file is run with /usr/bin/python3 (pymilter lives there)
  * Sendmail 8.17 is NOT installed (it conflicts with postfix): for --only sendmail the tool runs
    `apt-get download sendmail-bin sendmail-base sendmail-cf m4 libwrap0` + `dpkg-deb -x` into
    --sendmail-cache (default /var/tmp/milter-capture/sendmail) once, outside the namespace (needs
    a prior `apt-get update` and access to the apt mirror); later runs reuse the unpacked tree.
  * free loopback TCP ports 11001-11003 (milters), 11011-11013 (proxies), 2525-2528 (Postfix),
    2625 (Sendmail) -- inside the private network namespace, so they never clash with the host.
Only processes started by this tool are stopped, by pid (Postfix via `postfix -c DIR stop`).
"""

import argparse
import contextlib
import datetime
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import fixture_coverage as coverage  # noqa: E402
from recording_proxy import RecordingProxy  # noqa: E402

PY = "/usr/bin/python3"
FQDN = "capture.example.test"
GROUPS = ("postfix", "sendmail", "miltertest")
MODES = {"plain": (11001, 11011), "symlist": (11002, 11012), "noreply": (11003, 11013)}
PF_PORTS = {"v6": 2525, "v2": 2526, "symlist": 2527, "noreply": 2528}
SM_PORT = 2625
DATE = "Tue, 24 Nov 2026 12:00:00 +0000"


# --------------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------------
def sh(cmd, **kw):
    return subprocess.run(
        cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    ).stdout


def pkg_version(pkg):
    try:
        return sh(["dpkg-query", "-W", "-f=${Version}", pkg]).strip()
    except subprocess.CalledProcessError:
        return "?"


def wait_for(what, check, timeout=20.0, alive=None):
    """Poll check() every 50 ms until it is true (readiness), fail after timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(
                "%s: process %d exited with %s" % (what, alive.pid, alive.returncode)
            )
        time.sleep(0.05)
    raise TimeoutError("timeout waiting for " + what)


def port_open(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def listening(host, port):
    """True if some socket LISTENs on host:port -- read from /proc/net/tcp{,6} so that the check
    does not open an SMTP session (which would make the MTA open a milter connection)."""
    v6 = ":" in host
    if v6:
        want = "".join(
            "%08X" % int.from_bytes(socket.inet_pton(socket.AF_INET6, host)[i : i + 4], "little")
            for i in range(0, 16, 4)
        )
    else:
        want = "%08X" % int.from_bytes(socket.inet_aton(host), "little")
    want += ":%04X" % port
    with open("/proc/net/tcp6" if v6 else "/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            f = line.split()
            if f[1] == want and f[3] == "0A":
                return True
    return False


def stop_process(p, name, timeout=10):
    if p is None or p.poll() is not None:
        return
    p.terminate()  # SIGTERM to the pid we started
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        print("  %s (pid %d) ignored SIGTERM, SIGKILL" % (name, p.pid))
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------
# SMTP client (never pipelines: every command waits for its reply) over TCP or -bs pipes
# --------------------------------------------------------------------------------------------
class Smtp:
    def __init__(self, rfile, wfile, transcript):
        self.r, self.w, self.t = rfile, wfile, transcript

    @classmethod
    def tcp(cls, host, port, transcript):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect((host, port))
        c = cls(s.makefile("rb"), s.makefile("wb"), transcript)
        c.sock = s
        return c

    def reply(self):
        lines = []
        while True:
            line = self.r.readline()
            if not line:
                raise EOFError("SMTP server closed the connection")
            line = line.decode("latin-1").rstrip("\r\n")
            lines.append(line)
            self.t.append("S: " + line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), lines

    def cmd(self, line, expect=None):
        self.t.append("C: " + line)
        self.w.write(line.encode() + b"\r\n")
        self.w.flush()
        code, lines = self.reply()
        if expect is not None and code // 100 != expect // 100:
            raise RuntimeError("%r -> %s (wanted %d)" % (line, lines, expect))
        return code

    def data(self, msg):
        if self.cmd("DATA") != 354:
            return None
        out = bytearray()
        for line in msg.split(b"\r\n")[:-1] if msg.endswith(b"\r\n") else msg.split(b"\r\n"):
            out += (b"." + line if line.startswith(b".") else line) + b"\r\n"
        self.t.append("C: <%d bytes of message> ." % len(msg))
        self.w.write(bytes(out) + b".\r\n")
        self.w.flush()
        return self.reply()[0]

    def close(self):
        for f in (self.w, self.r):
            with contextlib.suppress(OSError):
                f.close()
        if getattr(self, "sock", None):
            self.sock.close()


def message(subject, body, rcpts=("rcpt1@example.test",), n=1):
    hdr = (
        "From: Sender <sender@example.test>\r\n"
        "To: %s\r\n"
        "Subject: %s\r\n"
        "Date: %s\r\n"
        "Message-ID: <capture-%d@example.test>\r\n"
        "X-Change-Me: original value\r\n"
        "X-Delete-Me: to be deleted\r\n"
        "X-Folded: first part of a folded header\r\n"
        "\tsecond part after a tab\r\n"
        "\r\n" % (", ".join(rcpts), subject, DATE, n)
    )
    return hdr.encode() + body


def big_body():
    """> 65535 bytes so that the MTA needs several BODY packets (one line starts with a dot)."""
    lines = [b".a line starting with a dot (dot-stuffed on the SMTP wire, not in the milter)\r\n"]
    size = len(lines[0])
    n = 0
    while size <= 70000:
        n += 1
        line = b"Body line %05d of the captured message ..................................\r\n" % n
        lines.append(line)
        size += len(line)
    return b"".join(lines)


SMALL_BODY = b"A short body line.\r\nSecond line.\r\n"
MODS = (
    "PROGRESS ADDHDR INSHDR CHGHDR DELHDR ADDRCPT ADDRCPTPAR DELRCPT CHGFROMARGS REPLBODY "
    "QUARANTINE eom-accept"
)


def multi_session(s, mta):
    """The main session: EHLO, unknown command, 4 messages, QUIT. Returns scenario notes."""
    s.reply()
    s.cmd("EHLO client.example.test", 250)
    s.cmd("XCAPTURE probe of an unknown command")  # -> milter 'U'
    body = big_body()
    # message 1: every modification at end of message, big body both ways, ESMTP args
    s.cmd("MAIL FROM:<sender@example.test> SIZE=%d BODY=8BITMIME" % (len(body) + 1000), 250)
    s.cmd(
        "RCPT TO:<rcpt1@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;rcpt1@example.test", 250
    )
    s.cmd("RCPT TO:<rcpt2@example.test> NOTIFY=NEVER", 250)
    s.cmd("RCPT TO:<rcpt-reject@example.test>")  # milter 'r' -> 5xx for this rcpt
    s.cmd("RCPT TO:<rcpt-tempfail@example.test>")  # milter 't' -> 4xx
    s.cmd("RCPT TO:<rcpt-reply@example.test>")  # milter 'y' -> custom 550
    s.data(message(MODS, body, ("rcpt1@example.test", "rcpt2@example.test"), 1))
    # message 2: multi-line custom reply at end of message
    s.cmd("MAIL FROM:<sender@example.test>", 250)
    s.cmd("RCPT TO:<rcpt1@example.test>", 250)
    s.data(message("eom-mlreply", SMALL_BODY, n=2))
    # message 3: discarded at end of message
    s.cmd("MAIL FROM:<sender@example.test>", 250)
    s.cmd("RCPT TO:<rcpt1@example.test>", 250)
    s.data(message("CHGFROM eom-discard", SMALL_BODY, n=3))
    # message 4: tempfail at end of message
    s.cmd("MAIL FROM:<sender@example.test>", 250)
    s.cmd("RCPT TO:<rcpt1@example.test>", 250)
    s.data(message("eom-tempfail", SMALL_BODY, n=4))
    # transaction 5: abandoned by RSET after RCPT
    s.cmd("MAIL FROM:<sender@example.test>", 250)
    s.cmd("RCPT TO:<rcpt1@example.test>", 250)
    s.cmd("RSET", 250)
    s.cmd("QUIT")
    return (
        mta + " session on one SMTP connection: EHLO; an unknown command 'XCAPTURE ...'; "
        "message 1 with MAIL FROM ESMTP args SIZE= BODY=8BITMIME, RCPTs with NOTIFY=/ORCPT=, "
        "three extra RCPTs the milter answers with reject 'r', tempfail 't' and a custom 550 "
        "reply 'y', a %d-byte body (several BODY packets), and at end of message the milter "
        "sends progress, add/insert/change/delete header, add rcpt (plain and with ESMTP args), "
        "delete rcpt, change sender with args, a >65535-byte replacement body (several 'b'), "
        "quarantine and accept; message 2 gets a multi-line custom reply at end of message; "
        "message 3 change sender without args then discard; message 4 tempfail; a fifth "
        "transaction abandoned with RSET after RCPT; QUIT." % len(body)
    )


def skip_session(s, mta):
    s.reply()
    s.cmd("EHLO client.example.test", 250)
    s.cmd("MAIL FROM:<sender@example.test>", 250)
    s.cmd("RCPT TO:<rcpt1@example.test>", 250)
    s.data(message("SKIP eom-reply", big_body(), n=5))
    s.cmd("QUIT")
    return (
        mta + " session: one message with a >65535-byte body; the milter answers the first "
        "BODY packet with SKIP 's' (SMFIP_SKIP negotiated), so the MTA stops sending body "
        "and goes to end of message, which gets a single-line custom reply 'y' (550); QUIT."
    )


def simple_session(
    s,
    mta,
    subject,
    what,
    *,
    unknown=True,
    helo="client.example.test",
    rcpts=("rcpt1@example.test",),
):
    s.reply()
    s.cmd("EHLO " + helo, 250)
    if unknown:
        s.cmd("XCAPTURE probe of an unknown command")
    s.cmd("MAIL FROM:<sender@example.test> SIZE=200", 250)
    for r in rcpts:
        s.cmd("RCPT TO:<%s>" % r)
    s.data(message(subject, SMALL_BODY, rcpts=rcpts, n=6))
    s.cmd("QUIT")
    return mta + " session: " + what


# --------------------------------------------------------------------------------------------
# fixture writing
# --------------------------------------------------------------------------------------------
class Writer:
    def __init__(self, out, how):
        self.out = out
        self.how = how
        self.written = []
        self.milter_desc = (
            "libmilter %s via python3-milter %s (tools/capture/reference_milter.py --mode %%s)"
            % (pkg_version("libmilter1.0.1"), pkg_version("python3-milter"))
        )

    def write(self, name, source, mode, scenario, rec, transcript=None):
        if rec.errors:
            raise RuntimeError("%s: proxy errors: %s" % (name, rec.errors))
        doc = {
            "source": source,
            "milter": self.milter_desc % mode,
            "captured": datetime.date.today().isoformat(),
            "how": self.how,
            "scenario": scenario,
            "packets": [{"dir": d, "hex": f.hex()} for d, f in rec.packets],
        }
        path = os.path.join(self.out, name + ".json")
        with open(path, "w") as fh:
            fh.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        self.written.append(path)
        cmds = "".join(chr(f[4]) if len(f) > 4 else "?" for d, f in rec.packets if d == "mta")
        reps = "".join(chr(f[4]) if len(f) > 4 else "?" for d, f in rec.packets if d == "milter")
        print(
            "  wrote %-45s %4d packets, %7d bytes of frames"
            % (os.path.relpath(path, REPO), len(rec.packets), sum(len(f) for _, f in rec.packets))
        )
        print("      mta->milter: %s" % cmds)
        print("      milter->mta: %s" % reps)
        if transcript is not None and os.environ.get("CAPTURE_VERBOSE"):
            print("      " + "\n      ".join(transcript))


def run_one(proxy, count, fn, timeout=60):
    """Run a driver function and collect the `count` milter connections it causes."""
    if proxy.pending():
        raise RuntimeError("proxy %s has %d stray connections" % (proxy.name, proxy.pending()))
    result = fn()
    return result, proxy.take(count, timeout)


# --------------------------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------------------------
def postfix_driver(work, proxies, writer):
    base = os.path.join(work, "postfix")
    etc = os.path.join(base, "etc")
    for d in ("etc", "queue", "data", "log"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    shutil.chown(os.path.join(base, "data"), "postfix")
    mp = lambda mode: "inet:127.0.0.1:%d" % MODES[mode][1]  # noqa: E731
    with open(os.path.join(etc, "main.cf"), "w") as fh:
        fh.write(
            """compatibility_level = 3.6
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
inet_interfaces = loopback-only
inet_protocols = all
mynetworks = 127.0.0.0/8 [::1]/128
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard
relay_transport = discard
smtp_dns_support_level = disabled
smtpd_tls_security_level = none
maillog_file = {base}/log/maillog
maillog_file_prefixes = {base}/log
biff = no
smtpd_milters = {plain}
non_smtpd_milters = {plain}
milter_protocol = 6
milter_default_action = tempfail
milter_connect_timeout = 10s
milter_command_timeout = 20s
milter_content_timeout = 60s
""".format(base=base, plain=mp("plain"))
        )
    smtpd = "inet n - n - - smtpd"
    with open(os.path.join(etc, "master.cf"), "w") as fh:
        fh.write(
            """127.0.0.1:{v6} {smtpd}
[::1]:{v6} {smtpd}
127.0.0.1:{v2} {smtpd} -o milter_protocol=2
127.0.0.1:{sym} {smtpd} -o smtpd_milters={symm}
127.0.0.1:{nr} {smtpd} -o smtpd_milters={nrm}
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
""".format(
                v6=PF_PORTS["v6"],
                v2=PF_PORTS["v2"],
                sym=PF_PORTS["symlist"],
                nr=PF_PORTS["noreply"],
                smtpd=smtpd,
                symm=mp("symlist"),
                nrm=mp("noreply"),
            )
        )
    ver = "postfix %s" % pkg_version("postfix")
    subprocess.run(["postfix", "-c", etc, "check"], check=False)
    sh(["postfix", "-c", etc, "start"])
    pidfile = os.path.join(base, "queue", "pid", "master.pid")
    try:
        for host, port in [*[("127.0.0.1", p) for p in PF_PORTS.values()], ("::1", PF_PORTS["v6"])]:
            wait_for(
                "postfix smtpd %s:%d" % (host, port),
                lambda host=host, port=port: listening(host, port),
            )
        with open(pidfile) as fh:
            master_pid = fh.read().strip()
        print(
            "postfix: master pid %s, smtpd on %s and [::1]:%d"
            % (master_pid, sorted(PF_PORTS.values()), PF_PORTS["v6"])
        )
        plain, sym, nr = proxies["plain"], proxies["symlist"], proxies["noreply"]

        def tcp(host, port, fn, *a, **kw):
            def go():
                t = []
                s = Smtp.tcp(host, port, t)
                try:
                    return fn(s, *a, **kw), t
                finally:
                    s.close()

            return go

        src6 = ver + " smtpd, milter_protocol=6"
        (sc, t), [r] = run_one(plain, 1, tcp("127.0.0.1", PF_PORTS["v6"], multi_session, "Postfix"))
        writer.write("postfix-smtpd-v6-multi", src6 + ", client 127.0.0.1", "plain", sc, r, t)

        (sc, t), [r] = run_one(plain, 1, tcp("127.0.0.1", PF_PORTS["v6"], skip_session, "Postfix"))
        writer.write("postfix-smtpd-v6-skip", src6 + ", client 127.0.0.1", "plain", sc, r, t)

        (sc, t), [r] = run_one(
            plain,
            1,
            tcp(
                "::1",
                PF_PORTS["v6"],
                simple_session,
                "Postfix",
                "ADDHDR eom-reply",
                "IPv6 client [::1]; EHLO, unknown command, one message "
                "(MAIL FROM with SIZE=); at end of message the milter "
                "adds a header and rejects with a custom 550 reply; QUIT.",
            ),
        )
        writer.write("postfix-smtpd-v6-ipv6", src6 + ", client ::1", "plain", sc, r, t)

        (sc, t), [r] = run_one(
            plain,
            1,
            tcp(
                "127.0.0.1",
                PF_PORTS["v2"],
                simple_session,
                "Postfix",
                "ADDHDR CHGHDR SMALLBODY eom-accept",
                "milter_protocol=2 (Postfix offers version 2); EHLO, an "
                "unknown command (not forwarded in v2), one message; at end "
                "of message add header, change header, replace body, accept; QUIT.",
            ),
        )
        writer.write("postfix-smtpd-v2", ver + " smtpd, milter_protocol=2", "plain", sc, r, t)

        (sc, t), [r] = run_one(
            sym,
            1,
            tcp(
                "127.0.0.1",
                PF_PORTS["symlist"],
                simple_session,
                "Postfix",
                "ADDHDR eom-accept",
                "the milter negotiates SETSYMLIST macro lists for "
                "connect/mail/rcpt/eom and opts out of HELO, DATA, UNKNOWN and "
                "EOH (NO* flags); EHLO, unknown command, one message with two "
                "recipients; add header, accept; QUIT.",
                unknown=True,
                helo="client.example.test",
                rcpts=("rcpt1@example.test", "rcpt2@example.test"),
            ),
        )
        writer.write("postfix-smtpd-v6-symlist", src6, "symlist", sc, r, t)

        (sc, t), [r] = run_one(
            nr,
            1,
            tcp(
                "127.0.0.1",
                PF_PORTS["noreply"],
                simple_session,
                "Postfix",
                "ADDHDR ADDRCPT",
                "the milter negotiates NR_* no-reply flags for connect, helo, "
                "mail, data, header, eoh, unknown and body (RCPT and end of "
                "message still answer); EHLO, unknown command, one message; "
                "add header, add recipient, continue; QUIT.",
            ),
        )
        writer.write("postfix-smtpd-v6-noreply", src6, "noreply", sc, r, t)

        def nonsmtp():
            msg = message(
                "ADDHDR CHGFROM eom-accept",
                SMALL_BODY,
                ("rcpt1@example.test", "rcpt2@example.test"),
                7,
            )
            p = subprocess.run(
                [
                    "sendmail",
                    "-C",
                    etc,
                    "-oi",
                    "-f",
                    "sender@example.test",
                    "rcpt1@example.test",
                    "rcpt2@example.test",
                ],
                input=msg.replace(b"\r\n", b"\n"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=30,
                check=False,
            )
            if p.returncode:
                raise RuntimeError("postfix sendmail: %s" % p.stdout)
            return (
                "Postfix non-SMTP path: sendmail(1) -f sender@example.test with two recipients "
                "-> postdrop -> pickup -> cleanup with non_smtpd_milters; the milter adds a "
                "header, changes the sender (no args) and accepts."
            )

        sc, [r] = run_one(plain, 1, nonsmtp)
        writer.write(
            "postfix-nonsmtp",
            ver + " cleanup (non_smtpd_milters, sendmail(1) -> pickup), milter_protocol=6",
            "plain",
            sc,
            r,
        )
    finally:
        mpid = None
        with contextlib.suppress(OSError, ValueError), open(pidfile) as fh:
            mpid = int(fh.read().strip())
        subprocess.run(
            ["postfix", "-c", etc, "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        if mpid:
            try:
                wait_for(
                    "postfix master %d to exit" % mpid,
                    lambda: not os.path.exists("/proc/%d" % mpid),
                )
            except TimeoutError:
                os.kill(mpid, 9)


# --------------------------------------------------------------------------------------------
# Sendmail
# --------------------------------------------------------------------------------------------
SM_PKGS = ["sendmail-bin", "sendmail-base", "sendmail-cf", "m4", "libwrap0"]


def sendmail_fetch(cache):
    """apt-get download + dpkg-deb -x (Sendmail conflicts with postfix: it is never installed)."""
    root = os.path.join(cache, "root")
    binary = os.path.join(root, "usr/libexec/sendmail/sendmail")
    if os.access(binary, os.X_OK):
        return root
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    print("sendmail: apt-get download %s into %s" % (" ".join(SM_PKGS), debs))
    subprocess.run(["apt-get", "download", *SM_PKGS], cwd=debs, check=True)
    for d in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        subprocess.run(["dpkg-deb", "-x", d, root], check=True)
    os.chmod(binary, os.stat(binary).st_mode & ~0o2000)  # setgid would ignore LD_LIBRARY_PATH
    return root


def sendmail_version(cache):
    debs = glob.glob(os.path.join(cache, "debs", "sendmail-bin_*.deb"))
    if debs:
        return sh(["dpkg-deb", "-f", debs[0], "Version"]).strip()
    return "?"


def sendmail_cf(smroot, inst, mode, daemon):
    cfdir = os.path.join(smroot, "usr/share/sendmail/cf")
    m4 = shutil.which("m4") or os.path.join(smroot, "usr/bin/m4")
    daemons = ""
    if daemon:
        daemons = (
            "DAEMON_OPTIONS(`Family=inet, Addr=127.0.0.1, Port=%d, Name=MTA')dnl\n"
            "DAEMON_OPTIONS(`Family=inet6, Addr=::1, Port=%d, Name=MTA6')dnl\n" % (SM_PORT, SM_PORT)
        )
    milter = (
        "INPUT_MAIL_FILTER(`reference', "
        "`S=inet:%d@127.0.0.1, F=T, T=C:10s;S:20s;R:20s;E:60s')dnl" % MODES[mode][1]
    )
    mc = """divert(0)dnl
VERSIONID(`milter-bridge fixture capture, mode {mode}')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{fqdn}')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confSERVICE_SWITCH_FILE', `{inst}/service.switch')dnl
define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl
define(`QUEUE_DIR', `{inst}/queue')dnl
define(`STATUS_FILE', `{inst}/statistics')dnl
define(`HELP_FILE', `{inst}/helpfile')dnl
define(`confPID_FILE', `{inst}/sendmail-{mode}.pid')dnl
define(`ALIAS_FILE', `')dnl
define(`confCW_FILE', `-o {inst}/local-host-names')dnl
define(`confTO_IDENT', `0s')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`confMILTER_LOG_LEVEL', `14')dnl
define(`confDELIVERY_MODE', `queueonly')dnl
define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`promiscuous_relay')dnl
{daemons}{milter}
MAILER(`local')dnl
MAILER(`smtp')dnl
""".format(mode=mode, fqdn=FQDN, inst=inst, daemons=daemons, milter=milter)
    mcpath = os.path.join(inst, "capture-%s.mc" % mode)
    cfpath = os.path.join(inst, "capture-%s.cf" % mode)
    with open(mcpath, "w") as fh:
        fh.write(mc)
    with open(cfpath, "w") as out:
        subprocess.run(
            [m4, "-D_CF_DIR_=%s/" % cfdir, os.path.join(cfdir, "m4/cf.m4"), mcpath],
            stdout=out,
            stderr=subprocess.DEVNULL,
            check=True,
        )  # (open-relay warning)
    return cfpath


def sendmail_driver(work, proxies, writer, cache):
    smroot = sendmail_fetch(cache)  # already done outside the namespace; just the path
    binary = os.path.join(smroot, "usr/libexec/sendmail/sendmail")
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(smroot, "usr/lib/x86_64-linux-gnu"))
    inst = os.path.join(work, "sendmail")
    os.makedirs(os.path.join(inst, "queue"), mode=0o700, exist_ok=True)
    for f in ("helpfile", "local-host-names", "statistics"):
        open(os.path.join(inst, f), "w").close()
    with open(os.path.join(inst, "service.switch"), "w") as fh:
        fh.write("hosts files\naliases files\n")
    cfs = {m: sendmail_cf(smroot, inst, m, m == "plain") for m in MODES}
    ver = "sendmail %s (Debian sendmail-bin, unpacked)" % sendmail_version(cache)
    with open(os.path.join(inst, "daemon.out"), "w") as daemon_out:
        daemon = subprocess.Popen(
            [binary, "-C", cfs["plain"], "-bD"],
            env=env,
            stdout=daemon_out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            "sendmail on 127.0.0.1:%d" % SM_PORT,
            lambda: listening("127.0.0.1", SM_PORT),
            alive=daemon,
        )
        wait_for("sendmail on [::1]:%d" % SM_PORT, lambda: listening("::1", SM_PORT), alive=daemon)
        print(
            "sendmail: daemon pid %d on 127.0.0.1:%d and [::1]:%d" % (daemon.pid, SM_PORT, SM_PORT)
        )
        plain, sym, nr = proxies["plain"], proxies["symlist"], proxies["noreply"]

        def tcp(host, fn, *a, **kw):
            def go():
                t = []
                s = Smtp.tcp(host, SM_PORT, t)
                try:
                    return fn(s, *a, **kw), t
                finally:
                    s.close()

            return go

        def bs(mode, fn, *a, **kw):
            def go():
                t = []
                p = subprocess.Popen(
                    [binary, "-C", cfs[mode], "-bs"],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                s = Smtp(p.stdout, p.stdin, t)
                try:
                    return fn(s, *a, **kw), t
                finally:
                    s.close()
                    p.wait(30)

            return go

        src = ver + " daemon (-bD)"
        (sc, t), [r] = run_one(plain, 1, tcp("127.0.0.1", multi_session, "Sendmail"))
        writer.write("sendmail-daemon-multi", src + ", client 127.0.0.1", "plain", sc, r, t)
        (sc, t), [r] = run_one(plain, 1, tcp("127.0.0.1", skip_session, "Sendmail"))
        writer.write("sendmail-daemon-skip", src + ", client 127.0.0.1", "plain", sc, r, t)
        (sc, t), [r] = run_one(
            plain,
            1,
            tcp(
                "::1",
                simple_session,
                "Sendmail",
                "ADDHDR eom-reply",
                "IPv6 client [::1] (DAEMON_OPTIONS Family=inet6); EHLO, "
                "unknown command, one message; add header, custom 550 "
                "reply at end of message; QUIT.",
            ),
        )
        writer.write("sendmail-daemon-ipv6", src + ", client ::1", "plain", sc, r, t)
        srcbs = ver + " -bs (SMTP on stdin/stdout)"
        (sc, t), [r] = run_one(
            plain,
            1,
            bs(
                "plain",
                simple_session,
                "Sendmail",
                "CHGFROM ADDRCPT DELRCPT eom-accept",
                "sendmail -bs (no socket: SMTP on a pipe); EHLO, unknown "
                "command, one message to rcpt1 and rcpt2; change sender "
                "without args, add and delete a recipient, accept; QUIT.",
                unknown=True,
                helo="client.example.test",
                rcpts=("rcpt1@example.test", "rcpt2@example.test"),
            ),
        )
        writer.write("sendmail-bs", srcbs, "plain", sc, r, t)
        (sc, t), [r] = run_one(
            sym,
            1,
            bs(
                "symlist",
                simple_session,
                "Sendmail",
                "ADDHDR eom-accept",
                "sendmail -bs; the milter negotiates SETSYMLIST macro lists "
                "for connect/mail/rcpt/eom and opts out of HELO, DATA, UNKNOWN "
                "and EOH; one message; add header, accept; QUIT.",
            ),
        )
        writer.write("sendmail-bs-symlist", srcbs, "symlist", sc, r, t)
        (sc, t), [r] = run_one(
            nr,
            1,
            bs(
                "noreply",
                simple_session,
                "Sendmail",
                "ADDHDR ADDRCPT",
                "sendmail -bs; the milter negotiates NR_* no-reply flags for "
                "connect, helo, mail, data, header, eoh, unknown and body; one "
                "message; add header, add recipient, continue; QUIT.",
            ),
        )
        writer.write("sendmail-bs-noreply", srcbs, "noreply", sc, r, t)
    finally:
        stop_process(daemon, "sendmail daemon")


# --------------------------------------------------------------------------------------------
# miltertest
# --------------------------------------------------------------------------------------------
def miltertest_driver(proxies, writer):
    plain = proxies["plain"]
    script = os.path.join(HERE, "miltertest_sessions.lua")
    ver = sh(["miltertest", "-V"]).strip().split(" v")[-1]
    src = "OpenDKIM miltertest %s (Debian miltertest %s), tools/capture/miltertest_sessions.lua" % (
        ver,
        pkg_version("miltertest"),
    )

    def go():
        p = subprocess.run(
            ["miltertest", "-D", "sock=inet:%d@127.0.0.1" % MODES["plain"][1], "-s", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            check=False,
        )
        if p.returncode:
            raise RuntimeError("miltertest failed (%d):\n%s" % (p.returncode, p.stdout))
        return [
            line.split(" ", 1)[1] for line in p.stdout.splitlines() if line.startswith("SESSION ")
        ]

    # the script announces its sessions; run it, then take that many recordings
    if plain.pending():
        raise RuntimeError("stray connections on the plain proxy")
    names = go()
    recs = plain.take(len(names), 60)
    scen = {
        "miltertest-full": "one connection: CONNECT with macros, HELO, UNKNOWN, MAIL with ESMTP "
        "args, five RCPTs (continue, continue, reject 'r', tempfail 't', custom reply 'y'), DATA, "
        "headers, EOH, two BODY chunks, end of message with progress, add/insert/change/delete "
        "header, add recipient (plain and with args), delete recipient, change sender with args, "
        "replace body, quarantine, accept; then a second transaction whose first BODY chunk is "
        "answered SKIP 's' and whose end of message is discarded 'd'; ABORT; QUIT.",
        "miltertest-stage-verdicts": "one connection, transactions ended by ABORT: UNKNOWN "
        "answered with a custom reply, MAIL discarded, MAIL accepted, RCPT discarded, RCPT "
        "accepted, EOH tempfailed, HEADER rejected, BODY answered with a multi-line custom reply; "
        "QUIT.",
        "miltertest-connect-ipv6-reject": "CONNECT from an IPv6 address (family '6', ::1) "
        "answered with reject; QUIT.",
        "miltertest-connect-unspec-tempfail": "CONNECT with an unknown address family ('U', no "
        "port or address) answered with tempfail; QUIT.",
        "miltertest-connect-accept": "CONNECT answered with accept (no further events); QUIT.",
        "miltertest-helo-reply": "CONNECT, then HELO answered with a custom 550 reply; QUIT.",
        "miltertest-negotiate-v2": "OPTNEG offering protocol version 2, actions 0x3f, steps 0x7f "
        "(like an old MTA); CONNECT .. end of message with add header, change header and a custom "
        "reply; QUIT.",
    }
    for name, r in zip(names, recs, strict=True):
        writer.write(name, src, "plain", scen.get(name, name), r)


# --------------------------------------------------------------------------------------------
# namespace + main
# --------------------------------------------------------------------------------------------
def enter_namespace(argv):
    if os.environ.get("CAPTURE_IN_NS") == "1":
        return
    os.environ["CAPTURE_IN_NS"] = "1"
    os.execvp(
        "unshare", ["unshare", "--net", "--uts", "--mount", PY, os.path.abspath(__file__), *argv]
    )


def setup_namespace(work):
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    socket.sethostname(FQDN)
    hosts = os.path.join(work, "hosts")
    with open(hosts, "w") as fh:
        fh.write("127.0.0.1 localhost %s\n::1 localhost %s\n" % (FQDN, FQDN))
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)


def main():
    ap = argparse.ArgumentParser(description="capture milter fixtures from real MTAs")
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/captured"))
    ap.add_argument(
        "--only",
        action="append",
        choices=GROUPS,
        help="capture only this group (repeatable); default: all",
    )
    ap.add_argument("--sendmail-cache", default="/var/tmp/milter-capture/sendmail")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary instance dirs")
    args = ap.parse_args()
    groups = args.only or list(GROUPS)
    if os.geteuid() != 0:
        sys.exit("capture.py: must run as root (postfix master, unshare, mount)")
    if os.environ.get("CAPTURE_IN_NS") != "1":
        if "sendmail" in groups:
            sendmail_fetch(args.sendmail_cache)  # needs the apt mirror: outside the namespace
        enter_namespace(sys.argv[1:])
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    how = "/usr/bin/python3 tools/capture/capture.py --out %s%s" % (
        os.path.relpath(out, REPO),
        "".join(" --only " + g for g in (args.only or [])),
    )
    work = tempfile.mkdtemp(prefix="milter-capture-")
    os.chmod(work, 0o755)
    setup_namespace(work)
    print("capture: namespace ready (lo only, hostname %s), work dir %s" % (FQDN, work))
    milters, proxies = {}, {}
    writer = Writer(out, how)
    try:
        for mode, (mport, _pport) in MODES.items():
            milters[mode] = subprocess.Popen(
                [
                    PY,
                    os.path.join(HERE, "reference_milter.py"),
                    "--mode",
                    mode,
                    "--socket",
                    "inet:%d@127.0.0.1" % mport,
                    "--log",
                    os.path.join(work, "milter-%s.log" % mode),
                ]
            )
        for mode, (mport, pport) in MODES.items():
            wait_for(
                "reference milter %s on %d" % (mode, mport),
                lambda mport=mport: port_open("127.0.0.1", mport),
                alive=milters[mode],
            )
            proxies[mode] = RecordingProxy("127.0.0.1", pport, "127.0.0.1", mport, name=mode)
        print(
            "capture: reference milters %s behind proxies %s"
            % ({m: p.pid for m, p in milters.items()}, {m: v[1] for m, v in MODES.items()})
        )
        for g in groups:
            for old in glob.glob(os.path.join(out, g + "-*.json")):
                os.unlink(old)
            print("== %s" % g)
            if g == "postfix":
                postfix_driver(work, proxies, writer)
            elif g == "sendmail":
                sendmail_driver(work, proxies, writer, args.sendmail_cache)
            else:
                miltertest_driver(proxies, writer)
    finally:
        for p in proxies.values():
            p.close()
        for mode, p in milters.items():
            stop_process(p, "reference milter " + mode)
        if args.keep_work:
            print("capture: work dir kept: %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "capture: %d fixture files written to %s"
        % (len(writer.written), os.path.relpath(out, REPO))
    )
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        coverage.update_readme(out, readme)
        print("capture: refreshed the generated tables in %s" % os.path.relpath(readme, REPO))
    print(coverage.render(out))


if __name__ == "__main__":
    main()
