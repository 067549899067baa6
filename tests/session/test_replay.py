"""Replay real MTA sessions: the session must answer exactly as libmilter did, byte for byte.

For each capture (a real Postfix, Sendmail or miltertest talking to libmilter):
the policy's capabilities are read off libmilter's OPTNEG reply (NO* -> SKIP,
NR* -> OBSERVE, otherwise DECIDE; its actions and macro lists), the MTA's
packets are fed to a Session, and whenever the session waits for the policy,
the policy answers what libmilter's milter answered (its reply packets turned
back into a ProcessResponse). Everything the session writes to the MTA must
equal what libmilter wrote, packet for packet.
"""

from __future__ import annotations

import re

import pytest

from milter_bridge.protocol import FrameDecoder, decode_reply, encode
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, ProtocolFlag
from milter_bridge.session import Output, Plan, ProgressToMta, SendToMta, Session, Stage
from milter_bridge.session.negotiation import symbol_lists
from milter_bridge.session.plan import flags_to_actions
from milter_bridge.session.stages import MACRO_STAGES, NO_FLAG, NR_FLAG
from milter_bridge.v1 import policy_pb2 as pb
from tests.captured import Capture, all_captures

_REPLY = re.compile(rb"(\d{3})[ -](?:([245]\.\d{1,3}\.\d{1,3}) )?(.*)", re.DOTALL)
_VERDICTS = {
    b"c": pb.ACTION_CONTINUE,
    b"a": pb.ACTION_ACCEPT,
    b"r": pb.ACTION_REJECT,
    b"t": pb.ACTION_TEMPFAIL,
    b"d": pb.ACTION_DISCARD,
    b"s": pb.ACTION_SKIP,
}


def capabilities_of(reply: r.OptionNegotiationReply) -> pb.Capabilities:
    """The policy that makes the bridge negotiate what libmilter negotiated."""
    modes = {}
    for event, no_flag in NO_FLAG.items():
        if reply.protocol & no_flag:
            modes[event.value] = pb.EVENT_MODE_SKIP
        elif reply.protocol & NR_FLAG[event]:
            modes[event.value] = pb.EVENT_MODE_OBSERVE
        else:
            modes[event.value] = pb.EVENT_MODE_DECIDE
    modes["end_of_message"] = pb.EVENT_MODE_DECIDE
    modes["abort"] = pb.EVENT_MODE_OBSERVE
    body = modes["body"] != pb.EVENT_MODE_SKIP
    macros = pb.MacroRequest()
    by_stage = {stage: name for name, stage in MACRO_STAGES.items()}
    for stage, names in reply.macros:
        getattr(macros, by_stage[stage]).extend(names.decode().split())
    return pb.Capabilities(
        events=pb.EventModes(**modes),
        header_delivery=pb.HEADER_DELIVERY_EACH,
        body_delivery=pb.BODY_DELIVERY_STREAM if body else pb.BODY_DELIVERY_NONE,
        actions=flags_to_actions(reply.actions),
        macros=macros,
    )


def verdict_of(reply: r.MilterReply) -> pb.Verdict:
    if isinstance(reply, r.ReplyCode):
        lines = [_REPLY.fullmatch(line) for line in reply.text.split(b"\r\n")]
        assert all(lines), reply
        code, xcode = lines[0][1], lines[0][2] or b""  # type: ignore[index]
        action = pb.ACTION_REJECT if code.startswith(b"5") else pb.ACTION_TEMPFAIL
        smtp = pb.SmtpReply(
            code=int(code),
            enhanced_code=xcode.decode(),
            lines=[m[3].decode() for m in lines],  # type: ignore[index]
        )
        return pb.Verdict(action=action, reply=smtp)
    return pb.Verdict(action=_VERDICTS[reply.code])


def modification_of(reply: r.MilterReply) -> pb.Modification:  # noqa: PLR0911
    match reply:
        case r.AddHeader(name=name, value=value):
            return pb.Modification(add_header=pb.AddHeader(name=name.decode(), value=value))
        case r.InsertHeader(index=index, name=name, value=value):
            insert = pb.InsertHeader(index=index, name=name.decode(), value=value)
            return pb.Modification(insert_header=insert)
        case r.ChangeHeader(index=index, name=name, value=b""):
            return pb.Modification(delete_header=pb.DeleteHeader(name=name.decode(), index=index))
        case r.ChangeHeader(index=index, name=name, value=value):
            change = pb.ChangeHeader(name=name.decode(), index=index, value=value)
            return pb.Modification(change_header=change)
        case r.AddRecipient(value=address):
            return pb.Modification(add_recipient=pb.AddRecipient(address=address.decode()))
        case r.AddRecipientWithArgs(address=address, args=args):
            add = pb.AddRecipient(
                address=address.decode(), esmtp_args=(args or b"").decode().split()
            )
            return pb.Modification(add_recipient=add)
        case r.DeleteRecipient(value=address):
            return pb.Modification(delete_recipient=pb.DeleteRecipient(address=address.decode()))
        case r.ChangeSender(address=address, args=args):
            sender = pb.ChangeSender(
                address=address.decode(), esmtp_args=(args or b"").decode().split()
            )
            return pb.Modification(change_sender=sender)
        case r.Quarantine(value=reason):
            return pb.Modification(quarantine=pb.Quarantine(reason=reason.decode()))
    msg = f"not a modification: {reply!r}"
    raise AssertionError(msg)


def responses_of(stage: Stage, sequence: int, frames: list[bytes]) -> list[pb.ProcessResponse]:
    """libmilter's reply packets to one command, as the policy's answers."""
    replies = [decode_reply(f) for frame in frames for f in FrameDecoder().feed(frame)]
    out = [
        pb.ProcessResponse(sequence=sequence, progress=pb.Progress())
        for x in replies
        if isinstance(x, r.Progress)
    ]
    replies = [x for x in replies if not isinstance(x, r.Progress)]
    *mods, final = replies
    verdict = verdict_of(final)
    if stage is not Stage.EOM:
        assert not mods, replies
        return [*out, pb.ProcessResponse(sequence=sequence, verdict=verdict)]
    eom = pb.EndOfMessageResponse(verdict=verdict)
    body: bytes | None = b"".join(m.chunk for m in mods if isinstance(m, r.ReplaceBody))
    for m in mods:
        if isinstance(m, r.ReplaceBody):
            # libmilter's REPLBODY packets are contiguous: one ReplaceBody where they start.
            if body is not None:
                eom.modifications.add(replace_body=pb.ReplaceBody(body=body))
                body = None
        else:
            eom.modifications.append(modification_of(m))
    return [*out, pb.ProcessResponse(sequence=sequence, end_of_message=eom)]


def writes(outputs: list[Output]) -> bytes:
    return b"".join(o.data for o in outputs if isinstance(o, SendToMta | ProgressToMta))


@pytest.mark.parametrize("capture", all_captures(), ids=lambda c: c.name)
def test_session_answers_as_libmilter_did(capture: Capture) -> None:
    exchanges = capture.exchanges()
    (optneg_in, (optneg_out,)), rest = exchanges[0], exchanges[1:]
    libmilter = decode_reply(FrameDecoder().feed(optneg_out)[0])
    assert isinstance(libmilter, r.OptionNegotiationReply)
    session = Session(Plan.from_capabilities(capabilities_of(libmilter)), connection_id="replay")
    ours = decode_reply(FrameDecoder().feed(writes(session.feed(optneg_in)))[0])
    assert isinstance(ours, r.OptionNegotiationReply)
    # Three deliberate differences, everything else is identical: libmilter asks
    # for SMFIP_SKIP whenever the MTA offers it, the bridge only when the policy
    # decides on body chunks; libmilter echoes SMFIF_SETSYMLIST whenever the
    # milter registered it, the bridge only when it sends macro lists; the bridge
    # sends the end-of-headers and end-of-message lists as a pair (Sendmail).
    skip, symlist = ProtocolFlag.SMFIP_SKIP, ActionFlag.SMFIF_SETSYMLIST
    actions = libmilter.actions if libmilter.macros else libmilter.actions & ~symlist
    assert ours == r.OptionNegotiationReply(
        libmilter.version,
        actions,
        libmilter.protocol & ~skip | ours.protocol & skip,
        symbol_lists(libmilter.macros),
    )
    decided = 0
    for n, (command, expected) in enumerate(rest, start=1):
        got = writes(session.feed(command))
        pending = session.pending
        if pending is not None:
            decided += 1
            for response in responses_of(pending.stage, pending.sequence, expected):
                got += writes(session.answer(response))
            assert session.pending is None
        assert got == b"".join(expected), f"exchange {n}: command {command[:40]!r}"
    assert decided > 0
    assert session.finished or capture.packets[-1].code != b"Q"


def test_progress_packet_matches_libmilter() -> None:
    # Also the bridge's own keep-alive: one SMFIR_PROGRESS packet, as smfi_progress sends.
    assert encode(r.Progress()) == b"\0\0\0\1p"
