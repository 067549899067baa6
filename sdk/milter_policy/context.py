"""The context a handler gets: what is known of the connection and message, and the actions.

One Context per SMTP session (one Process stream). Verdict methods set the
answer to the current event; modification methods are valid only in the
end-of-message handler and go out in call order before the verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from milter_bridge.v1 import policy_pb2 as pb

log = logging.getLogger("milter_policy")

__all__ = ["Client", "Context", "Envelope", "PolicyUsageError"]


class PolicyUsageError(Exception):
    """An action called where it is not valid (e.g. add_header() outside end_of_message)."""


@dataclass
class Client:
    """The SMTP client, as the MTA saw it."""

    hostname: str = ""
    address: str = ""
    port: int = 0
    family: str = "unknown"  # "inet", "inet6", "unix" or "unknown"


@dataclass
class Envelope:
    """The current message's envelope, as far as it is known."""

    sender: str = ""
    sender_args: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    # True when the bridge held only the first recipients for the end of message
    # (its --max-recipients / --max-recipient-buffer); rcpt_to events had them all.
    recipients_truncated: bool = False


# Macro stages in the order of a session; entering one of _CLEARS_LATER makes later ones stale.
_STAGES = ("connect", "helo", "mail_from", "rcpt_to", "data", "end_of_headers", "end_of_message")
_CLEARS_LATER = frozenset({"connect", "helo", "mail_from", "rcpt_to"})

_FAMILY: dict[int, str] = {
    pb.ADDRESS_FAMILY_INET: "inet",
    pb.ADDRESS_FAMILY_INET6: "inet6",
    pb.ADDRESS_FAMILY_UNIX: "unix",
}


# Modification -> the Actions fields of which the MTA must have granted one (libmilter:
# smfi_addheader and smfi_insheader need SMFIF_ADDHDRS, smfi_chgheader SMFIF_CHGHDRS, ...).
_NEEDS: dict[str, tuple[str, ...]] = {
    "add_header": ("add_header",),
    "insert_header": ("add_header",),
    "change_header": ("change_header",),
    "delete_header": ("change_header",),
    "add_recipient": ("add_recipient", "add_recipient_with_args"),
    "add_recipient_with_args": ("add_recipient_with_args",),
    "delete_recipient": ("delete_recipient",),
    "replace_body": ("replace_body",),
    "set_sender": ("change_sender",),
    "quarantine": ("quarantine",),
}
_warned: set[str] = set()  # modifications refused for want of a grant, logged once each


class Context:
    """A connection's state and the actions for the event being handled."""

    def __init__(self) -> None:
        self.connection_id = ""
        self.protocol_version = 0
        # 0, or how many times the bridge sent this session again after its stream to a
        # replica broke (StreamStart.attempt): a policy that counts or stores events
        # treats (connection_id, sequence) as already seen.
        self.attempt = 0
        # In a replay, while an event that was already answered is handled again: the
        # action it got ("continue", "reject", ...), which the MTA was given. The
        # handler rebuilds the policy's state; the verdict it sets is not sent.
        self.decided: str | None = None
        self.client = Client()
        self.helo = ""
        self.envelope = Envelope()
        # (name, value) pairs in message order, as far as delivered to this policy.
        self.headers: list[tuple[str, bytes]] = []
        # True when the bridge held only the first headers (its --max-headers /
        # --max-header-buffer) for a batch at end of headers or end of message.
        self.headers_truncated = False
        self.body = b""
        self.body_truncated = False
        # Per connection, for the policy's own use; kept across messages.
        self.state: dict[str, Any] = {}
        # Macros per stage, invalidated as libmilter does (a new MAIL FROM clears
        # those of RCPT TO and later, and so on).
        self._stages: dict[str, dict[str, str]] = {}
        self._event = ""
        self._verdict: pb.Verdict | None = None
        self._modifications: list[pb.Modification] = []
        self._send_progress: Callable[[], object] | None = None
        # What the MTA granted (StreamStart.negotiated.actions); None: not known, all allowed.
        self._granted: pb.Actions | None = None

    # -- what is known ---------------------------------------------------------

    @property
    def macros(self) -> dict[str, str]:
        """The macros valid now, by name without braces (``j``, ``i``, ``auth_authen``).

        The bridge sends each event only its own stage's macros; this merges the
        stages held, a later stage winning in session order (connect, helo,
        mail_from, rcpt_to, data, end_of_headers, end_of_message). An event of a
        stage replaces that stage's macros (also with none); connect, helo,
        mail_from and rcpt_to drop the stages after theirs, as libmilter does; at
        end of message the envelope's per-stage macros, when asked for, replace
        the earlier stages. So, like libmilter's smfi_getsymval, it also finds
        macros of earlier stages (unlike it, end_of_message wins over
        end_of_headers).
        """
        merged: dict[str, str] = {}
        for stage in _STAGES:  # later stages win
            merged.update(self._stages.get(stage, {}))
        return merged

    def macro(self, name: str, default: str | None = None) -> str | None:
        """One macro from ``macros`` (earlier stages too); ``j`` and ``{j}`` are the same name.

        ``default`` when no stage held has it, e.g. when no event of its stage
        reached this policy: name it in ``Policy(macros=...)`` for a stage the
        policy receives, or get the envelope at end of message.
        """
        bare = name[1:-1] if name.startswith("{") and name.endswith("}") else name
        return self.macros.get(bare, default)

    def _enter_stage(self, event: str, macros: dict[str, str]) -> None:
        if event in _CLEARS_LATER:
            for later in _STAGES[_STAGES.index(event) + 1 :]:
                self._stages.pop(later, None)
        if event in _STAGES:
            self._replace_stage(event, macros)

    def _replace_stage(self, stage: str, macros: dict[str, str]) -> None:
        if stage in _STAGES:
            self._stages[stage] = macros

    def header(self, name: str) -> list[bytes]:
        """The values of every header with this name (case-insensitive), in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    # -- verdicts --------------------------------------------------------------

    def _set(self, action: int, reply: pb.SmtpReply | None = None) -> None:
        self._verdict = pb.Verdict(action=action)  # type: ignore[arg-type]
        if reply is not None:
            self._verdict.reply.CopyFrom(reply)

    def continue_(self) -> None:
        """Go on (the default when a handler sets no verdict)."""
        self._set(pb.ACTION_CONTINUE)

    def accept(self) -> None:
        """Accept the message (at connect or helo: the whole session) without further events."""
        self._set(pb.ACTION_ACCEPT)

    def discard(self) -> None:
        """Accept the message and drop it silently (from mail_from on)."""
        self._set(pb.ACTION_DISCARD)

    def skip(self) -> None:
        """Send no more body chunks for this message (in the body handler)."""
        self._set(pb.ACTION_SKIP)

    def reject(
        self, text: str | Sequence[str] | None = None, *, code: int = 550, xcode: str = "5.7.1"
    ) -> None:
        """Refuse permanently; with ``text`` (one line or several) as a custom reply."""
        self._refuse(pb.ACTION_REJECT, text, code, xcode)

    def tempfail(
        self, text: str | Sequence[str] | None = None, *, code: int = 451, xcode: str = "4.7.1"
    ) -> None:
        """Refuse temporarily; with ``text`` (one line or several) as a custom reply."""
        self._refuse(pb.ACTION_TEMPFAIL, text, code, xcode)

    def _refuse(self, action: int, text: str | Sequence[str] | None, code: int, xcode: str) -> None:
        if text is None:
            self._set(action)
            return
        lines = [text] if isinstance(text, str) else list(text)
        self._set(action, pb.SmtpReply(code=code, enhanced_code=xcode, lines=lines))

    def progress(self) -> None:
        """Tell the MTA the policy is still working (end_of_message only; the bridge also does)."""
        self._only_at_eom("progress")
        if self._send_progress is not None:
            self._send_progress()

    # -- modifications (end_of_message only) -------------------------------------

    def _only_at_eom(self, what: str) -> None:
        if self._event != "end_of_message":
            where = f"in {self._event}" if self._event else "outside a handler"
            msg = f"{what}() is only valid in the end_of_message handler, not {where}"
            raise PolicyUsageError(msg)

    def granted(self, modification: str) -> bool:
        """Whether the MTA granted ``modification`` (a method name below, or
        ``add_recipient_with_args``). An MTA grants what the policy asked for in its
        actions, unless it cannot: Sendmail's milter ``F=`` flags or an old MTA may not."""
        granted = self._granted
        if granted is None:
            return True
        return any(getattr(granted, field) for field in _NEEDS[modification])

    def _modify(self, what: str, needs: str, **modification: Any) -> bool:
        """Queue a modification; False, as libmilter's MI_FAILURE, when the MTA did not
        grant it (sending it would make the bridge refuse the whole answer)."""
        self._only_at_eom(what)
        if not self.granted(needs):
            if needs not in _warned:
                _warned.add(needs)
                log.warning("the MTA did not grant %s: %s() does nothing", needs, what)
            return False
        self._modifications.append(pb.Modification(**modification))
        return True

    def add_header(self, name: str, value: str | bytes) -> bool:
        """Append a header. False when the MTA did not grant it (as every method below)."""
        add = pb.AddHeader(name=name, value=_bytes(value))
        return self._modify("add_header", "add_header", add_header=add)

    def insert_header(self, index: int, name: str, value: str | bytes) -> bool:
        """Insert a header; 0 is above the MTA's own Received: header, 1 just below it."""
        insert = pb.InsertHeader(index=index, name=name, value=_bytes(value))
        return self._modify("insert_header", "insert_header", insert_header=insert)

    def change_header(self, name: str, value: str | bytes, index: int = 1) -> bool:
        """Replace occurrence ``index`` (from 1) of a header."""
        change = pb.ChangeHeader(name=name, index=index, value=_bytes(value))
        return self._modify("change_header", "change_header", change_header=change)

    def delete_header(self, name: str, index: int = 1) -> bool:
        """Remove occurrence ``index`` (from 1); for several, delete from the last one back."""
        delete = pb.DeleteHeader(name=name, index=index)
        return self._modify("delete_header", "delete_header", delete_header=delete)

    def add_recipient(self, address: str, args: Iterable[str] = ()) -> bool:
        """Add a recipient, optionally with ESMTP arguments such as ``NOTIFY=NEVER``."""
        add = pb.AddRecipient(address=address, esmtp_args=list(args))
        needs = "add_recipient_with_args" if add.esmtp_args else "add_recipient"
        return self._modify("add_recipient", needs, add_recipient=add)

    def delete_recipient(self, address: str) -> bool:
        """Remove a recipient, given as the MTA sent it (e.g. ``<a@example.org>``)."""
        delete = pb.DeleteRecipient(address=address)
        return self._modify("delete_recipient", "delete_recipient", delete_recipient=delete)

    def replace_body(self, body: bytes) -> bool:
        """Replace the whole body (lines end with CRLF)."""
        replace = pb.ReplaceBody(body=body)
        return self._modify("replace_body", "replace_body", replace_body=replace)

    def set_sender(self, address: str, args: Iterable[str] = ()) -> bool:
        """Change the envelope sender, optionally with ESMTP arguments."""
        change = pb.ChangeSender(address=address, esmtp_args=list(args))
        return self._modify("set_sender", "set_sender", change_sender=change)

    def quarantine(self, reason: str) -> bool:
        """Hold the message (Postfix: hold queue; Sendmail: quarantine)."""
        return self._modify("quarantine", "quarantine", quarantine=pb.Quarantine(reason=reason))


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def family_name(family: int) -> str:
    return _FAMILY.get(family, "unknown")
