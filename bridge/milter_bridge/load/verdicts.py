"""Which answers are valid at which stage, and what Postfix makes of them.

``judge`` takes the replies that answered one event (any progress and
modifications, then one final reply) and returns the verdict as Postfix 3.7
applies it, the modifications by kind, and the protocol errors: ``fatal`` for
those after which Postfix drops the milter (milter8_comm_error/conf_error),
``problems`` for those Postfix tolerates but the protocol (or Sendmail) does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag


class Stage(Enum):
    OPTNEG = "optneg"
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOM = "eom"


class Kind(Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    SKIP = "skip"


# Replies that end the MTA's wait for one event (PROGRESS and modifications do not).
FINAL = (
    r.Continue,
    r.Accept,
    r.Reject,
    r.TempFail,
    r.Discard,
    r.Skip,
    r.ReplyCode,
    r.OptionNegotiationReply,
)
_BARE: dict[type, Kind] = {
    r.Continue: Kind.CONTINUE,
    r.Accept: Kind.ACCEPT,
    r.Reject: Kind.REJECT,
    r.TempFail: Kind.TEMPFAIL,
    r.Discard: Kind.DISCARD,
    r.Skip: Kind.SKIP,
}

# Modification -> (kind counted, action flag it needs).
_MODIFICATIONS: dict[type, tuple[str, ActionFlag]] = {
    r.AddHeader: ("add_header", ActionFlag.SMFIF_ADDHDRS),
    r.InsertHeader: ("insert_header", ActionFlag.SMFIF_ADDHDRS),
    r.ChangeHeader: ("change_header", ActionFlag.SMFIF_CHGHDRS),
    r.AddRecipient: ("add_recipient", ActionFlag.SMFIF_ADDRCPT),
    r.AddRecipientWithArgs: ("add_recipient_with_args", ActionFlag.SMFIF_ADDRCPT_PAR),
    r.DeleteRecipient: ("delete_recipient", ActionFlag.SMFIF_DELRCPT),
    r.ChangeSender: ("change_sender", ActionFlag.SMFIF_CHGFROM),
    r.ReplaceBody: ("replace_body", ActionFlag.SMFIF_CHGBODY),
    r.Quarantine: ("quarantine", ActionFlag.SMFIF_QUARANTINE),
}
# Postfix's check of each line of a custom reply (milter8.c, SMFIR_REPLYCODE): a 4xx or
# 5xx code, then space or hyphen, and an enhanced code (if any) of the same class.
# Checked here for every line of a multi-line reply, which Postfix leaves as an XXX.
_REPLY_LINE = re.compile(rb"[45]\d\d[ -](\d?)")


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    code: bytes = b""  # the SMTP code of a custom reply

    @property
    def label(self) -> str:
        return f"{self.kind.value} {self.code.decode()}" if self.code else self.kind.value


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    modifications: tuple[str, ...] = ()
    progress: int = 0
    problems: tuple[str, ...] = ()
    fatal: str = ""


def _reply_code_problem(text: bytes) -> str:
    lines = text.split(b"\r\n")
    for line in lines:
        match = _REPLY_LINE.match(line)
        if match is None or (match[1] and match[1] != line[:1]) or line[:3] != text[:3]:
            return f"malformed custom reply {text[:80]!r}"
    return ""


def _fatal(text: str) -> Judgement:
    return Judgement(Verdict(Kind.TEMPFAIL), fatal=text)


def _before_final(
    stage: Stage, replies: list[r.MilterReply], actions: ActionFlag
) -> tuple[list[str], int, list[str]] | str:
    """Modifications by kind, progress count, problems; or the fatal problem."""
    mods: list[str] = []
    progress = 0
    problems: list[str] = []
    body_run_over = False  # a REPLBODY run ended: another one would interleave
    for reply in replies:
        if isinstance(reply, r.Progress):
            progress += 1
            if stage is not Stage.EOM:
                problems.append(f"PROGRESS at {stage.value} (Sendmail refuses it)")
            continue
        kind, needs = _MODIFICATIONS[type(reply)]
        if isinstance(reply, r.ChangeHeader) and not reply.value:
            kind = "delete_header"
        if stage is not Stage.EOM:
            if not isinstance(reply, r.Quarantine):
                return f"{kind} at {stage.value}"
            # Postfix takes it anywhere; Sendmail only at end of message.
            problems.append(f"quarantine at {stage.value} (only valid at end of message)")
        if isinstance(reply, r.ReplaceBody):
            if body_run_over:
                return "replace_body chunks interleaved with other modifications"
            if mods and mods[-1] == kind:
                continue  # one replacement, several chunks
        elif mods and mods[-1] == "replace_body":
            body_run_over = True
        if not actions & needs:
            problems.append(f"{kind} without {needs.name} negotiated")
        mods.append(kind)
    return mods, progress, problems


def _final(reply: r.MilterReply, stage: Stage) -> Verdict | str:
    """The verdict of a final reply, or the fatal problem."""
    if isinstance(reply, r.OptionNegotiationReply):
        return f"OPTNEG reply at {stage.value}"
    if isinstance(reply, r.ReplyCode):
        bad = _reply_code_problem(reply.text)
        if bad:
            return bad
        kind = Kind.REJECT if reply.text[:1] == b"5" else Kind.TEMPFAIL
        return Verdict(kind, reply.text[:3])
    return Verdict(_BARE[type(reply)])


def judge(
    stage: Stage, replies: list[r.MilterReply], actions: ActionFlag, *, skip: bool
) -> Judgement:
    """The answer to one event; ``replies`` ends with its final reply."""
    before = _before_final(stage, replies[:-1], actions)
    if isinstance(before, str):
        return _fatal(before)
    mods, progress, problems = before
    verdict = _final(replies[-1], stage)
    if isinstance(verdict, str):
        return _fatal(verdict)
    if verdict.kind is Kind.DISCARD and stage in (Stage.CONNECT, Stage.HELO):
        problems.append(f"DISCARD at {stage.value} (Postfix ignores it)")
        verdict = Verdict(Kind.CONTINUE)
    elif verdict.kind is Kind.SKIP and stage is not Stage.BODY:
        problems.append(f"SKIP at {stage.value} (only valid for a body chunk)")
        verdict = Verdict(Kind.CONTINUE)
    elif verdict.kind is Kind.SKIP and not skip:
        problems.append("SKIP without SMFIP_SKIP negotiated")
    return Judgement(verdict, tuple(mods), progress, tuple(problems))
