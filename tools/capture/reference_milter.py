#!/usr/bin/python3
"""Reference milter for the fixture capture (pymilter = Debian python3-milter, i.e. libmilter 8.17).

Usage: /usr/bin/python3 tools/capture/reference_milter.py --mode plain|symlist|noreply \
           --socket inet:PORT@127.0.0.1 [--log FILE]

It is the *milter side* of the captured sessions: every reply byte in the fixtures was written by
libmilter on behalf of this program. Its behaviour is driven by the message, so one MTA session can
produce many reply types:

  stage      what is looked at                   keyword  -> reply
  connect    client host name                    connect-<verdict>
  helo       HELO/EHLO name                      helo-<verdict>
  mail       MAIL FROM address                   mail-<verdict>
  rcpt       RCPT TO address                     rcpt-<verdict>
  data       (nothing)                           continue
  unknown    the unknown SMTP command line       unknown-<verdict>
  header     header value                        header-<verdict>
  eoh        Subject                             eoh-<verdict>
  body       Subject                             body-<verdict>; SKIP -> 's' (only if SMFIP_SKIP
                                                 was negotiated), answered on the first chunk
  eom        Subject tokens (any combination, applied in this order):
               PROGRESS    smfi_progress            'p'
               ADDHDR      addheader                'h'
               INSHDR      addheader(idx=0)         'i'
               CHGHDR      chgheader(X-Change-Me,1) 'm'
               DELHDR      chgheader(X-Delete-Me,1,'') 'm' with empty value
               ADDRCPT     addrcpt                  '+'
               ADDRCPTPAR  addrcpt with ESMTP args  '2'
               DELRCPT     delrcpt(<rcpt2@example.test>) '-'
               CHGFROM     chgfrom without args     'e'
               CHGFROMARGS chgfrom with args        'e'
               REPLBODY    replacebody (> 65535 bytes, several 'b' packets)
               SMALLBODY   replacebody (one short 'b' packet)
               QUARANTINE  quarantine               'q'
             then the verdict eom-<verdict> (default: continue)
  <verdict> is one of accept, reject, tempfail, discard, reply (550/451 custom 'y'),
  mlreply (multi-line custom 'y'), continue.

Modes (they change the OPTNEG reply 'O'):
  plain    all callbacks implemented, replies to everything; O without macro lists.
  symlist  SETSYMLIST: O carries macro lists (@Milter.symlist) and NO* flags for the callbacks it
           does not implement (helo, data, unknown, eoh).
  noreply  NR_* flags via @Milter.noreply for connect, helo, mail, data, header, eoh, unknown, body
           (RCPT and EOM still answer).
Stdlib + Milter only; run with /usr/bin/python3 (pymilter lives there).
"""

import argparse
import os
import re
import sys
import time
import types

import Milter

# settings from the command line (set once in main)
CONFIG = types.SimpleNamespace(log=None)


def log(*parts):
    line = "%.3f pid=%d %s" % (time.time(), os.getpid(), " ".join(str(p) for p in parts))
    if CONFIG.log:
        with open(CONFIG.log, "a") as fh:
            fh.write(line + "\n")


VERDICT_RE = {}


def verdict(stage, text):
    """Find '<stage>-<verdict>' in text (case-insensitive); return the verdict word or None."""
    rx = VERDICT_RE.get(stage)
    if rx is None:
        rx = VERDICT_RE[stage] = re.compile(
            r"%s-(accept|reject|tempfail|discard|mlreply|reply|continue)\b" % stage, re.I
        )
    m = rx.search(text or "")
    return m.group(1).lower() if m else None


def replacement_body():
    """A body larger than 65535 bytes, CRLF lines: libmilter splits it into several 'b' packets."""
    lines = []
    n = 0
    size = 0
    while size <= 70000:
        n += 1
        line = (
            "Replacement body line %05d from the reference milter .........................\r\n" % n
        )
        lines.append(line)
        size += len(line)
    return "".join(lines).encode("ascii")


class Reference(Milter.Base):
    def __init__(self):
        self.id = Milter.uniqueID()
        self.subject = ""
        self.body_chunks = 0

    # --- helpers -------------------------------------------------------------------------------
    def answer(self, stage, word):
        """Turn a verdict word into a pymilter return code (setting a custom reply if asked)."""
        log(self.id, stage, "verdict", word)
        if word is None or word == "continue":
            return Milter.CONTINUE
        if word == "accept":
            return Milter.ACCEPT
        if word == "reject":
            return Milter.REJECT
        if word == "tempfail":
            return Milter.TEMPFAIL
        if word == "discard":
            return Milter.DISCARD
        if word == "reply":
            self.setreply("550", "5.7.1", "reference milter rejects at %s" % stage)
            return Milter.REJECT
        if word == "mlreply":
            self.setreply(
                "550",
                "5.7.1",
                "reference milter rejects at %s, line 1" % stage,
                "line 2 of the multi-line reply",
                "line 3, the last one",
            )
            return Milter.REJECT
        raise ValueError(word)

    # --- callbacks -----------------------------------------------------------------------------
    def connect(self, hostname, family, hostaddr):
        log(self.id, "connect", hostname, family, hostaddr)
        return self.answer("connect", verdict("connect", hostname))

    def hello(self, heloname):
        log(self.id, "helo", heloname)
        return self.answer("helo", verdict("helo", heloname))

    def envfrom(self, mailfrom, *esmtp):
        self.subject = ""
        self.body_chunks = 0
        log(self.id, "mail", mailfrom, esmtp, "i=%s" % self.getsymval("i"))
        return self.answer("mail", verdict("mail", mailfrom))

    def envrcpt(self, to, *esmtp):
        log(self.id, "rcpt", to, esmtp)
        return self.answer("rcpt", verdict("rcpt", to))

    def data(self):
        log(self.id, "data")
        return Milter.CONTINUE

    def unknown(self, cmd):
        log(self.id, "unknown", cmd)
        return self.answer("unknown", verdict("unknown", cmd))

    def header(self, name, value):
        if name.lower() == "subject":
            self.subject = value
        log(self.id, "header", name, repr(value)[:80])
        return self.answer("header", verdict("header", value))

    def eoh(self):
        log(self.id, "eoh")
        return self.answer("eoh", verdict("eoh", self.subject))

    def body(self, chunk):
        self.body_chunks += 1
        log(self.id, "body", len(chunk), "protocol=0x%x" % self._protocol)
        if "SKIP" in self.subject.split() and self._protocol & Milter.P_SKIP:
            return Milter.SKIP
        return self.answer("body", verdict("body", self.subject))

    def eom(self):
        tokens = self.subject.split()
        log(self.id, "eom", "subject=%r" % self.subject, "chunks=%d" % self.body_chunks)
        if "PROGRESS" in tokens:
            self.progress()
        if "ADDHDR" in tokens:
            self.addheader("X-Ref-Added", "added by the reference milter")
        if "INSHDR" in tokens:
            self.addheader("X-Ref-Inserted", "inserted at index 0", 0)
        if "CHGHDR" in tokens:
            self.chgheader("X-Change-Me", 1, "changed by the reference milter")
        if "DELHDR" in tokens:
            self.chgheader("X-Delete-Me", 1, "")
        if "ADDRCPT" in tokens:
            self.addrcpt("<added@example.test>")
        if "ADDRCPTPAR" in tokens:
            self.addrcpt("<added-par@example.test>", "NOTIFY=NEVER")
        if "DELRCPT" in tokens:
            self.delrcpt("<rcpt2@example.test>")
        if "CHGFROM" in tokens:
            self.chgfrom("<new-sender@example.test>")
        if "CHGFROMARGS" in tokens:
            self.chgfrom("<new-sender-args@example.test>", "BODY=8BITMIME")
        if "REPLBODY" in tokens:
            self.replacebody(replacement_body())
        if "SMALLBODY" in tokens:
            self.replacebody(b"Short replacement body.\r\n")
        if "QUARANTINE" in tokens:
            self.quarantine("held by the reference milter")
        return self.answer("eom", verdict("eom", self.subject))

    def abort(self):
        log(self.id, "abort")
        return Milter.CONTINUE

    def close(self):
        log(self.id, "close")
        return Milter.CONTINUE


class SymList(Reference):
    """OPTNEG reply with SETSYMLIST macro lists; helo/data/unknown/eoh not wanted (NO* flags)."""

    def negotiate(self, opts):
        # Milter.Base.negotiate does the same, but pymilter 1.0.5's Base.setsymlist passes bytes
        # to the C extension, which wants str, and Base.negotiate then silently falls back to
        # ALL_OPTS: @Milter.symlist has no effect on Python 3. So call the context directly.
        self._actions, p, _f1, _f2 = opts
        if not self._actions & Milter.SETSYMLIST:
            raise Milter.DisabledAction("SETSYMLIST not offered by the MTA")
        for name, stage in sorted(Milter.MACRO_CALLBACKS.items(), key=lambda kv: kv[1]):
            syms = getattr(getattr(self, name), "_symlist", None)
            if syms is not None:
                self._ctx.setsymlist(stage, " ".join(syms))
        opts[1] = self._protocol = p & ~self.protocol_mask()
        opts[2] = 0
        opts[3] = 0
        log(self.id, "negotiated", [hex(o) for o in opts])
        return Milter.CONTINUE

    @Milter.symlist("j", "{client_addr}", "{daemon_name}")
    def connect(self, hostname, family, hostaddr):
        return Reference.connect(self, hostname, family, hostaddr)

    @Milter.symlist("i", "{mail_addr}")
    def envfrom(self, mailfrom, *esmtp):
        return Reference.envfrom(self, mailfrom, *esmtp)

    @Milter.symlist("{rcpt_addr}")
    def envrcpt(self, to, *esmtp):
        return Reference.envrcpt(self, to, *esmtp)

    @Milter.symlist("i", "{msg_id}")
    def eom(self):
        return Reference.eom(self)

    @Milter.nocallback
    def hello(self, _heloname):
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self):
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, _cmd):
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self):
        return Milter.CONTINUE


class NoReply(Reference):
    """NR_* flags: the MTA must not wait for replies to these callbacks (they return CONTINUE)."""

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        Reference.connect(self, hostname, family, hostaddr)
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, heloname):
        Reference.hello(self, heloname)
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mailfrom, *esmtp):
        Reference.envfrom(self, mailfrom, *esmtp)
        return Milter.CONTINUE

    @Milter.noreply
    def data(self):
        return Milter.CONTINUE

    @Milter.noreply
    def unknown(self, cmd):
        Reference.unknown(self, cmd)
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        Reference.header(self, name, value)
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self):
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, _chunk):
        self.body_chunks += 1
        return Milter.CONTINUE


MODES = {"plain": Reference, "symlist": SymList, "noreply": NoReply}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="plain")
    ap.add_argument("--socket", default="inet:10999@127.0.0.1")
    ap.add_argument("--log")
    args = ap.parse_args()
    CONFIG.log = args.log
    Milter.factory = MODES[args.mode]
    Milter.set_flags(
        Milter.ADDHDRS
        | Milter.CHGBODY
        | Milter.ADDRCPT
        | Milter.ADDRCPT_PAR
        | Milter.DELRCPT
        | Milter.CHGHDRS
        | Milter.QUARANTINE
        | Milter.CHGFROM
        | Milter.SETSYMLIST
    )
    log("listening", args.socket, "mode", args.mode)
    Milter.runmilter("reference", args.socket, 120)
    log("stopped")


if __name__ == "__main__":
    sys.exit(main())
