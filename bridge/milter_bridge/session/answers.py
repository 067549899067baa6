"""A policy's answer -> the exact reply packets libmilter would send, or InvalidAnswer.

Which answer is valid where (PROTOCOL-NOTES, checked against Postfix
milter8.c and Sendmail milter.c):

    answer           CONNECT HELO  MAIL  RCPT  DATA HEADER EOH  BODY  EOM  UNKNOWN
    continue            y     y     y     y     y    y     y    y     y     y
    accept              y     y     y     y     y    y     y    y     y     -  (1)
    reject/tempfail     y     y     y     y     y    y     y    y     y     y
    discard             -     -     y     y     y    y     y    y     y     -  (2)
    skip                -     -     -     -     -    -     -    y     -     -
    progress            -     -     -     -     -    -     -    -     y     -  (3)
    modifications       -     -     -     -     -    -     -    -     y     -

(1) Postfix marks the message accepted outside a transaction and can then
    panic at the next MAIL. (2) Postfix ignores DISCARD at CONNECT/HELO with a
    warning. (3) Sendmail treats PROGRESS before end of message as an error.

A custom reply is one SMFIR_REPLYCODE packet, only with a 5xx for reject and
a 4xx for tempfail (libmilter's sendreply), formatted as smfi_setmlreply
does. Modifications come first, in the policy's order, then the verdict.
"""

from __future__ import annotations

import re

from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import MILTER_CHUNK_SIZE, ActionFlag
from milter_bridge.protocol.errors import InvalidAnswer, InvalidModification, quoted
from milter_bridge.session.plan import enum_name
from milter_bridge.session.stages import NO_DISCARD, Stage
from milter_bridge.v1 import policy_pb2 as pb

MAX_REPLY_LINES = 32  # libmilter MAXREPLIES
MAX_REPLY_LINE = 980  # libmilter MAXREPLYLEN, per line of text
MAX_HEADER_NAME = 997  # RFC 5322 line limit less ": "
MAX_HEADER_VALUE = 65535  # one packet; Postfix cuts headers at header_size_limit (100 KB)
MAX_ADDRESS = 4096

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_REPLY_TEXT = re.compile(r"[\t\x20-\x7e]*")  # RFC 5321 textstring: printable US-ASCII and tab
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # printable ASCII without ':'
# A LF not followed by a space or tab, or a bare CR: either would start a new header line.
_FOLD = re.compile(rb"\r?\n(?![ \t])|\r(?!\n)")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_EMPTY_FOLD = re.compile(rb"\n[ \t]*(\n|$)")


def _fail(stage: Stage, problem: str) -> InvalidAnswer:
    return InvalidAnswer(f"answer to {stage.value}: {problem}")


def _bad_mod(stage: Stage, problem: str) -> InvalidModification:
    return InvalidModification(f"answer to {stage.value}: {problem}")


def format_reply(stage: Stage, reply: pb.SmtpReply, klass: str) -> bytes:
    """The SMFIR_REPLYCODE text: ``550-5.7.1 a\\r\\n550 5.7.1 b`` (smfi_setmlreply's layout)."""
    code = str(reply.code)
    if not (len(code) == 3 and code[0] == klass and code.isdigit()):
        verdict = "REJECT" if klass == "5" else "TEMPFAIL"
        raise _fail(stage, f"reply code {reply.code} is not a {klass}xx code (needed by {verdict})")
    xcode = reply.enhanced_code
    if xcode and not (_ENHANCED.fullmatch(xcode) and xcode[0] == klass):
        raise _fail(stage, f"enhanced code {quoted(xcode)} is not {klass}.x.y matching {code}")
    lines = list(reply.lines)
    if not 1 <= len(lines) <= MAX_REPLY_LINES:
        raise _fail(stage, f"a reply needs 1 to {MAX_REPLY_LINES} lines, not {len(lines)}")
    out = []
    for n, line in enumerate(lines):
        if any(ch in line for ch in "\r\n\0"):
            raise _fail(stage, f"reply line {n + 1} contains CR, LF or NUL: {quoted(line)}")
        if not _REPLY_TEXT.fullmatch(line):
            raise _fail(stage, f"reply line {n + 1} is not printable US-ASCII: {quoted(line)}")
        if not xcode and line[:1].isdigit():
            # Postfix reads a digit after the code as an enhanced code whose class must
            # match, and drops the milter over a mismatch.
            raise _fail(stage, f"reply line {n + 1} starts with a digit; set enhanced_code")
        # Sendmail uses the text as a format string; Postfix turns %% back into %.
        text = line.replace("%", "%%")
        if len(text.encode()) > MAX_REPLY_LINE:
            raise _fail(stage, f"reply line {n + 1} is longer than {MAX_REPLY_LINE} bytes")
        sep = " " if n == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{xcode} {text}" if xcode else f"{code}{sep}{text}")
    return "\r\n".join(out).encode()


def verdict_replies(stage: Stage, verdict: pb.Verdict, *, skip: bool) -> list[r.MilterReply]:
    """The reply packet for a verdict at ``stage``; ``skip``: SMFIP_SKIP was negotiated."""
    action = verdict.action
    if verdict.HasField("reply") and action not in (pb.ACTION_REJECT, pb.ACTION_TEMPFAIL):
        name = enum_name(pb.Action.DESCRIPTOR, action)
        raise _fail(stage, f"a custom reply goes with REJECT or TEMPFAIL, not {name}")
    if action == pb.ACTION_CONTINUE:
        return [r.Continue()]
    if action == pb.ACTION_ACCEPT:
        if stage is Stage.UNKNOWN:
            raise _fail(stage, "ACCEPT is not valid for an unknown command")
        return [r.Accept()]
    if action in (pb.ACTION_REJECT, pb.ACTION_TEMPFAIL):
        klass = "5" if action == pb.ACTION_REJECT else "4"
        if verdict.HasField("reply"):
            return [r.ReplyCode(format_reply(stage, verdict.reply, klass))]
        return [r.Reject() if klass == "5" else r.TempFail()]
    if action == pb.ACTION_DISCARD:
        if stage in NO_DISCARD:
            raise _fail(stage, "DISCARD is only valid from mail_from on")
        return [r.Discard()]
    if action == pb.ACTION_SKIP:
        if stage is not Stage.BODY:
            raise _fail(stage, "SKIP is only valid for body_chunk")
        # Without SMFIP_SKIP the MTA would not understand 's': continue, and the
        # session stops forwarding the body instead.
        return [r.Skip() if skip else r.Continue()]
    raise _fail(stage, f"verdict action {action} is not a valid Action")


def header_value(stage: Stage, value: bytes) -> bytes:
    """A header value as milter wants it: folds as LF + whitespace, no other CR or LF."""
    value = value.replace(b"\r\n", b"\n")
    if b"\0" in value or _FOLD.search(value) or value.startswith(b"\n"):
        raise _bad_mod(
            stage, f"header value has NUL or a CR/LF that does not fold: {quoted(value)}"
        )
    if _CONTROL.search(value) or _EMPTY_FOLD.search(value):
        raise _bad_mod(
            stage, f"header value has control characters or an empty folded line: {quoted(value)}"
        )
    if len(value) > MAX_HEADER_VALUE:
        raise _bad_mod(stage, f"header value of {len(value)} bytes exceeds {MAX_HEADER_VALUE}")
    return value


def header_name(stage: Stage, name: str) -> bytes:
    if not _HEADER_NAME.fullmatch(name) or len(name) > MAX_HEADER_NAME:
        raise _bad_mod(stage, f"{quoted(name)} is not a header name (printable ASCII without ':')")
    return name.encode()


def _token(stage: Stage, what: str, text: str, *, spaces: bool = True) -> bytes:
    """An address, ESMTP argument or reason: non-empty UTF-8 without NUL, CR or LF."""
    data = text.encode()
    bad = "\0\r\n" if spaces else "\0\r\n \t"
    if not data or any(ch in text for ch in bad) or len(data) > MAX_ADDRESS:
        raise _bad_mod(
            stage, f"{what} {quoted(text)} is empty, too long or contains forbidden characters"
        )
    return data


def _args(stage: Stage, args: list[str]) -> bytes | None:
    if not args:
        return None
    return b" ".join(_token(stage, "ESMTP argument", a, spaces=False) for a in args)


def _need(stage: Stage, granted: ActionFlag, flag: ActionFlag, what: str) -> None:
    if not granted & flag:
        raise _bad_mod(stage, f"{what} needs {flag.name}, which was not negotiated")


_STAGE = Stage.EOM
_A = ActionFlag
_Replies = list[r.MilterReply]


def _add_header(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_ADDHDRS, "add_header")
    a = m.add_header
    return [r.AddHeader(header_name(_STAGE, a.name), header_value(_STAGE, a.value))]


def _insert_header(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_ADDHDRS, "insert_header")
    i = m.insert_header
    return [r.InsertHeader(i.index, header_name(_STAGE, i.name), header_value(_STAGE, i.value))]


def _change_header(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_CHGHDRS, "change_header")
    ch = m.change_header
    if ch.index < 1:
        raise _bad_mod(_STAGE, f"change_header index counts from 1, got {ch.index}")
    value = header_value(_STAGE, ch.value)
    if not value:
        raise _bad_mod(_STAGE, "change_header with an empty value; use delete_header")
    return [r.ChangeHeader(ch.index, header_name(_STAGE, ch.name), value)]


def _delete_header(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_CHGHDRS, "delete_header")
    d = m.delete_header
    if d.index < 1:
        raise _bad_mod(_STAGE, f"delete_header index counts from 1, got {d.index}")
    # CHGHEADER with an empty value deletes.
    return [r.ChangeHeader(d.index, header_name(_STAGE, d.name), b"")]


def _add_recipient(m: pb.Modification, granted: ActionFlag) -> _Replies:
    rc = m.add_recipient
    address = _token(_STAGE, "recipient", rc.address)
    if not rc.esmtp_args and granted & _A.SMFIF_ADDRCPT:
        return [r.AddRecipient(address)]
    # With arguments, or when only ADDRCPT_PAR was granted (args then omitted, as
    # smfi_addrcpt_par sends NULL args).
    what = "add_recipient with esmtp_args" if rc.esmtp_args else "add_recipient"
    _need(_STAGE, granted, _A.SMFIF_ADDRCPT_PAR, what)
    return [r.AddRecipientWithArgs(address, _args(_STAGE, list(rc.esmtp_args)))]


def _delete_recipient(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_DELRCPT, "delete_recipient")
    d = m.delete_recipient
    raw = d.address_raw or _token(_STAGE, "recipient", d.address)
    if b"\0" in raw or b"\r" in raw or b"\n" in raw or len(raw) > MAX_ADDRESS:
        raise _bad_mod(
            _STAGE, "delete_recipient address_raw contains NUL, CR or LF, or is too long"
        )
    return [r.DeleteRecipient(raw)]


def _replace_body(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_CHGBODY, "replace_body")
    body = m.replace_body.body
    # libmilter sends one empty packet for an empty body; Postfix then empties it.
    return [
        r.ReplaceBody(body[i : i + MILTER_CHUNK_SIZE])
        for i in range(0, max(len(body), 1), MILTER_CHUNK_SIZE)
    ]


def _change_sender(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_CHGFROM, "change_sender")
    cs = m.change_sender
    address = _token(_STAGE, "sender", cs.address)
    return [r.ChangeSender(address, _args(_STAGE, list(cs.esmtp_args)))]


def _quarantine(m: pb.Modification, granted: ActionFlag) -> _Replies:
    _need(_STAGE, granted, _A.SMFIF_QUARANTINE, "quarantine")
    return [r.Quarantine(_token(_STAGE, "quarantine reason", m.quarantine.reason))]


_MODIFICATIONS = {
    "add_header": _add_header,
    "insert_header": _insert_header,
    "change_header": _change_header,
    "delete_header": _delete_header,
    "add_recipient": _add_recipient,
    "delete_recipient": _delete_recipient,
    "replace_body": _replace_body,
    "change_sender": _change_sender,
    "quarantine": _quarantine,
}


def modification_replies(mods: list[pb.Modification], granted: ActionFlag) -> _Replies:
    """The packets for an ordered list of modifications, checked against the granted actions."""
    out: _Replies = []
    kinds = [m.WhichOneof("modification") for m in mods]
    if kinds.count("replace_body") > 1:
        # Postfix refuses body chunks interleaved with other modifications.
        raise _bad_mod(_STAGE, "more than one replace_body (MTAs need one contiguous body)")
    for mod, kind in zip(mods, kinds, strict=True):
        if kind is None:
            raise _bad_mod(_STAGE, "a Modification with nothing set")
        out += _MODIFICATIONS[kind](mod, granted)
    return out


def end_of_message_replies(
    answer: pb.EndOfMessageResponse, granted: ActionFlag
) -> list[r.MilterReply]:
    """Modifications in order, then exactly one final verdict."""
    if not answer.HasField("verdict"):
        raise _fail(Stage.EOM, "end_of_message has no verdict")
    mods = modification_replies(list(answer.modifications), granted)
    return [*mods, *verdict_replies(Stage.EOM, answer.verdict, skip=False)]
