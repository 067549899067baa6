"""Every way the rogue policy (``tests/faults/rogue.py``) breaks the policy contract.

Each breach is one small function of one Process call (``Call``), registered with
the stage at which the bridge must give the failure action and the cause it
must count (``failure_actions_total{stage,cause}``), and a pattern the reason in
its WARNING line (``policy failure at STAGE: REASON; answering ACTION``) matches.
A *tolerated* breach (stage None) breaks a rule the bridge can absorb without
failing the message: the MTA gets the policy's own verdict.

The session's requests: 1 ``start``, 2 ``mail_from`` and 3 ``end_of_message``
(the only events the rogue's capabilities ask for), both decided.

At mail_from (the MTA gets the failure action, tempfail, at MAIL FROM: ``mail tempfail``):

- ``wrong_sequence``: names sequence 9 -> ``invalid_reply``
- ``stale_sequence``: names sequence 1, the start, which asks for nothing -> ``invalid_reply``
- ``no_verdict``: a ProcessResponse holding no answer -> ``invalid_reply``
- ``unspecified_action``: ACTION_UNSPECIFIED -> ``invalid_reply``
- ``unnamed_action_with_reply``: action 10, which Action does not name -> ``invalid_reply``
- ``skip_at_mail_from``: SKIP, only valid for a body chunk -> ``invalid_reply``
- ``progress_at_mail_from``: progress, only valid at end of message -> ``invalid_reply``
- ``modifications_at_mail_from``: an end-of-message answer (add_header) -> ``invalid_reply``
- ``not_a_process_response``: bytes that do not parse -> ``invalid_reply``
- ``unavailable_at_mail_from``: ends every call with UNAVAILABLE (the bridge reopens the
  stream twice, replaying it) -> ``unreachable``
- ``refuses_the_stream``: FAILED_PRECONDITION at ``start`` -> ``refused_stream``
- ``ends_at_start``: ends the call with OK at ``start`` -> ``stream_error``
- ``raises_at_mail_from``: its handler raises (status UNKNOWN) -> ``stream_error``

At end of message, mail_from answered well (``eom tempfail``):

- ``answers_mail_from_twice``: the duplicate is read as the answer to 3 -> ``invalid_reply``
- ``floods_answers``: 100 answers to mail_from -> ``invalid_reply``
- ``answers_before_asked``: answers 3 (ACCEPT) together with 2, before 3 is sent
  -> ``invalid_reply`` (or, when it arrives after 3 was sent after all, it is the answer)
- ``never_answers``: -> ``timeout`` (the deadline)
- ``floods_progress_forever``: progress every 5 ms, never an answer -> ``timeout``
- ``ends_at_end_of_message``: ends the call with OK -> ``stream_error``
- ``unavailable_after_a_reply``: UNAVAILABLE; not reopened, a reply was used -> ``unreachable``
- ``internal_error``, ``resource_exhausted``, ``cancelled``, ``permission_denied``: ends the
  call with that status -> ``stream_error``
- ``deadline_exceeded``: ends the call with DEADLINE_EXCEEDED -> ``timeout``
- ``unnegotiated_modification``: add_header, then quarantine (not in its actions)
  -> ``refused_modification``; the add_header must not reach the MTA either
- ``crlf_in_header_value``, ``crlf_in_header_name``, ``nul_in_header_value``,
  ``oversized_header_value`` (1 MiB): -> ``refused_modification``
- ``reject_with_250``, ``reject_with_451``, ``enhanced_code_of_the_wrong_class`` (550 4.7.1),
  ``reply_line_with_crlf``, ``reply_without_lines``, ``reply_line_starting_with_a_digit``:
  custom replies -> ``invalid_reply``
- ``skip_at_end_of_message``: SKIP -> ``invalid_reply``
- ``huge_response``: an answer over the bridge's 64 MiB limit -> ``stream_error``

Tolerated (the MTA gets the policy's verdict):

- ``floods_progress``: 200 progress responses before the answer (the bridge forwards
  at most one a second)
- ``answers_end_of_message_twice``: the duplicate comes after the last question of the
  session; nobody reads it
- ``lingers_after_the_half_close``: does not end the call when the bridge half-closes
  it: cancelled after 5 s, with a WARNING of its own
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
import grpc.aio

from milter_bridge.v1 import policy_pb2 as pb

MARKER = b"REJECT"  # fleet.MARKER: a Subject holding it is rejected
MAIL, EOM = "mail_from", "end_of_message"
Context = grpc.aio.ServicerContext[pb.ProcessRequest, bytes]
Record = Callable[[str], None]


def verdict(
    sequence: int, action: int = pb.ACTION_CONTINUE, reply: pb.SmtpReply | None = None
) -> bytes:
    answer = pb.Verdict(action=action, reply=reply)  # type: ignore[arg-type]  # any number
    return pb.ProcessResponse(sequence=sequence, verdict=answer).SerializeToString()


def modified(sequence: int, *modifications: pb.Modification) -> bytes:
    """An end-of-message answer: these modifications, then continue."""
    answer = pb.EndOfMessageResponse(
        modifications=modifications, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
    )
    return pb.ProcessResponse(sequence=sequence, end_of_message=answer).SerializeToString()


def progress(sequence: int) -> bytes:
    return pb.ProcessResponse(sequence=sequence, progress=pb.Progress()).SerializeToString()


def add_header(name: str, value: bytes) -> pb.Modification:
    return pb.Modification(add_header=pb.AddHeader(name=name, value=value))


def reject(sequence: int, code: int, xcode: str, *lines: str) -> bytes:
    return verdict(
        sequence, pb.ACTION_REJECT, pb.SmtpReply(code=code, enhanced_code=xcode, lines=lines)
    )


class Call:
    """One Process call as the rogue sees it: read requests, write raw responses."""

    def __init__(
        self, requests: AsyncIterator[pb.ProcessRequest], context: Context, record: Record
    ) -> None:
        self._requests = requests
        self.context = context
        self._record = record

    async def asked(self) -> pb.ProcessRequest | None:
        """The next request that awaits an answer; None once the bridge half-closed."""
        while True:
            try:
                request = await anext(self._requests)
            except StopAsyncIteration:
                return None
            if request.reply_expected:
                return request

    async def next_asked(self) -> pb.ProcessRequest:
        request = await self.asked()
        if request is None:
            msg = "the bridge ended the stream before asking"
            raise RuntimeError(msg)
        return request

    async def send(self, *responses: bytes) -> None:
        for response in responses:
            await self.context.write(response)

    async def rest(self) -> None:
        """Reads on, answering nothing, until the bridge half-closes or cancels the call."""
        while await self.asked() is not None:
            pass

    async def abort(self, code: grpc.StatusCode) -> NoReturn:
        await self.context.abort(code, f"rogue policy: {code.name}")
        raise AssertionError  # abort() raises

    def good(self, request: pb.ProcessRequest) -> bytes:
        """The well-behaved answer; a decision at end of message is recorded first."""
        if not request.HasField("end_of_message"):
            return verdict(request.sequence)
        headers = request.end_of_message.headers
        if any(h.name.lower() == "subject" and MARKER in h.value for h in headers):
            self._record("reject")
            return reject(request.sequence, 550, "5.7.1", "marked")
        self._record("continue")
        return modified(request.sequence, add_header("X-Bench", b"1"))

    async def mail_answered(self) -> pb.ProcessRequest:
        """mail_from answered well; the end-of-message request that follows."""
        await self.send(self.good(await self.next_asked()))
        return await self.next_asked()


Act = Callable[[Call], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Breach:
    act: Act
    stage: str | None  # where the failure action is due; None: tolerated
    cause: str | None
    # A regular expression the failure line's reason matches; tolerated: its WARNING, if any.
    reason: str
    # The verdict the MTA gets when the breach loses a race it cannot always win; see
    # answers_before_asked.
    raced: str | None = None


BREACHES: dict[str, Breach] = {}


def breach(
    stage: str | None, cause: str | None, reason: str = "", raced: str | None = None
) -> Callable[[Act], Act]:
    def register(act: Act) -> Act:
        BREACHES[act.__name__] = Breach(act, stage, cause, reason, raced)
        return act

    return register


async def well_behaved(call: Call) -> None:
    while (request := await call.asked()) is not None:
        await call.send(call.good(request))


# -- at mail_from ---------------------------------------------------------------


@breach(MAIL, "invalid_reply", r"answer for sequence 9, but 2 \(mail_from\) awaits it")
async def wrong_sequence(call: Call) -> None:
    await call.send(verdict((await call.next_asked()).sequence + 7))
    await call.rest()


@breach(MAIL, "invalid_reply", r"answer for sequence 1, but 2 \(mail_from\) awaits it")
async def stale_sequence(call: Call) -> None:
    await call.next_asked()
    await call.send(verdict(1))
    await call.rest()


@breach(MAIL, "invalid_reply", r"answer to mail_from \(sequence 2\) holds no verdict")
async def no_verdict(call: Call) -> None:
    sequence = (await call.next_asked()).sequence
    await call.send(pb.ProcessResponse(sequence=sequence).SerializeToString())
    await call.rest()


@breach(MAIL, "invalid_reply", r"verdict action 0 is not a valid Action")
async def unspecified_action(call: Call) -> None:
    await call.send(verdict((await call.next_asked()).sequence, pb.ACTION_UNSPECIFIED))
    await call.rest()


@breach(MAIL, "invalid_reply", r"a custom reply goes with REJECT or TEMPFAIL, not 10")
async def unnamed_action_with_reply(call: Call) -> None:
    # proto3 enums are open: any number parses (fuzz/regressions/session_answer).
    reply = pb.SmtpReply(code=550, lines=["no"])
    await call.send(verdict((await call.next_asked()).sequence, 10, reply))
    await call.rest()


@breach(MAIL, "invalid_reply", r"SKIP is only valid for body_chunk")
async def skip_at_mail_from(call: Call) -> None:
    await call.send(verdict((await call.next_asked()).sequence, pb.ACTION_SKIP))
    await call.rest()


@breach(MAIL, "invalid_reply", r"progress is only valid for end_of_message")
async def progress_at_mail_from(call: Call) -> None:
    await call.send(progress((await call.next_asked()).sequence))
    await call.rest()


@breach(MAIL, "invalid_reply", r"modifications are only valid for end_of_message")
async def modifications_at_mail_from(call: Call) -> None:
    sequence = (await call.next_asked()).sequence
    await call.send(modified(sequence, add_header("X-Bench", b"1")))
    await call.rest()


@breach(MAIL, "invalid_reply", r"the policy's reply is not a ProcessResponse")
async def not_a_process_response(call: Call) -> None:
    await call.next_asked()
    await call.send(b"\xff\xff\xff\xff")  # a truncated varint: no protobuf message
    await call.rest()


@breach(MAIL, "unreachable", r"stream failed: UNAVAILABLE: rogue policy")
async def unavailable_at_mail_from(call: Call) -> None:
    # Before any reply was used: the bridge opens the stream again and replays it
    # (StreamStart.attempt 1, 2); the same session_id gets the same breach.
    await call.next_asked()
    await call.abort(grpc.StatusCode.UNAVAILABLE)


@breach(MAIL, "refused_stream", r"stream failed: FAILED_PRECONDITION: rogue policy")
async def refuses_the_stream(call: Call) -> None:
    # A refusal ends the call at `start`, while the bridge writes mail_from: grpc.aio
    # may put INTERNAL over the status; the bridge keeps Core's (first_status.py).
    await call.abort(grpc.StatusCode.FAILED_PRECONDITION)


@breach(MAIL, "stream_error", r"the policy ended the stream without answering|stream failed: OK")
async def ends_at_start(call: Call) -> None:
    return  # status OK, with mail_from owed an answer


@breach(MAIL, "stream_error", r"stream failed: UNKNOWN: Unexpected .*RuntimeError")
async def raises_at_mail_from(call: Call) -> None:
    await call.next_asked()
    msg = "rogue policy bug"
    raise RuntimeError(msg)


# -- at end of message -------------------------------------------------------------


@breach(EOM, "invalid_reply", r"answer for sequence 2, but 3 \(end_of_message\) awaits it")
async def answers_mail_from_twice(call: Call) -> None:
    answer = call.good(await call.next_asked())
    await call.send(answer, answer)
    await call.rest()


@breach(EOM, "invalid_reply", r"answer for sequence 2, but 3 \(end_of_message\) awaits it")
async def floods_answers(call: Call) -> None:
    # Over the 64 unread responses a stream may hold: the reader fails the call; the
    # first unread one is still taken before that failure, and is refused.
    await call.send(*[call.good(await call.next_asked())] * 100)
    await call.rest()


@breach(EOM, "invalid_reply", r"sequence 3 before it was sent", raced="accept")
async def answers_before_asked(call: Call) -> None:
    # The answer to end of message (ACCEPT) goes right after mail_from's, so it
    # normally arrives while the MTA is still sending the rest of the message. Should
    # this process stall between its two writes for longer than that round trip, it
    # arrives after end of message was sent: an answer like any, which the bridge
    # must take (measured under load: 8 in 1000).
    mail = await call.next_asked()
    await call.send(call.good(mail), verdict(mail.sequence + 1, pb.ACTION_ACCEPT))
    await call.rest()


@breach(EOM, "timeout", r"no answer within [0-9.]+s")
async def never_answers(call: Call) -> None:
    await call.mail_answered()
    await call.rest()


@breach(EOM, "timeout", r"no answer within [0-9.]+s")
async def floods_progress_forever(call: Call) -> None:
    # Progress does not stretch the deadline.
    sequence = (await call.mail_answered()).sequence
    while True:  # until the bridge cancels the call: write() raises then
        await call.send(progress(sequence))
        await asyncio.sleep(0.005)


@breach(EOM, "stream_error", r"the policy ended the stream without answering|stream failed: OK")
async def ends_at_end_of_message(call: Call) -> None:
    await call.mail_answered()


@breach(EOM, "unreachable", r"stream failed: UNAVAILABLE: rogue policy")
async def unavailable_after_a_reply(call: Call) -> None:
    await call.mail_answered()
    await call.abort(grpc.StatusCode.UNAVAILABLE)


@breach(EOM, "stream_error", r"stream failed: INTERNAL: rogue policy")
async def internal_error(call: Call) -> None:
    await call.mail_answered()
    await call.abort(grpc.StatusCode.INTERNAL)


@breach(EOM, "stream_error", r"stream failed: RESOURCE_EXHAUSTED: rogue policy")
async def resource_exhausted(call: Call) -> None:
    await call.mail_answered()
    await call.abort(grpc.StatusCode.RESOURCE_EXHAUSTED)


@breach(EOM, "stream_error", r"stream failed: CANCELLED: rogue policy")
async def cancelled(call: Call) -> None:
    await call.mail_answered()
    await call.abort(grpc.StatusCode.CANCELLED)


@breach(EOM, "stream_error", r"stream failed: PERMISSION_DENIED: rogue policy")
async def permission_denied(call: Call) -> None:
    await call.mail_answered()
    await call.abort(grpc.StatusCode.PERMISSION_DENIED)


@breach(EOM, "timeout", r"stream failed: DEADLINE_EXCEEDED: rogue policy")
async def deadline_exceeded(call: Call) -> None:
    await call.mail_answered()
    await call.abort(grpc.StatusCode.DEADLINE_EXCEEDED)


@breach(EOM, "refused_modification", r"quarantine needs SMFIF_QUARANTINE, which was not negotiated")
async def unnegotiated_modification(call: Call) -> None:
    quarantine = pb.Modification(quarantine=pb.Quarantine(reason="rogue"))
    sequence = (await call.mail_answered()).sequence
    await call.send(modified(sequence, add_header("X-Bench", b"1"), quarantine))
    await call.rest()


@breach(EOM, "refused_modification", r"header value has NUL or a CR/LF that does not fold")
async def crlf_in_header_value(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(modified(sequence, add_header("X-Bench", b"1\r\nBcc: victim@example.test")))
    await call.rest()


@breach(EOM, "refused_modification", r"is not a header name")
async def crlf_in_header_name(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(modified(sequence, add_header("X-Bench\r\nBcc", b"victim@example.test")))
    await call.rest()


@breach(EOM, "refused_modification", r"header value has NUL or a CR/LF that does not fold")
async def nul_in_header_value(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(modified(sequence, add_header("X-Bench", b"1\x00hidden")))
    await call.rest()


@breach(EOM, "refused_modification", r"header value of 1048576 bytes exceeds 65535")
async def oversized_header_value(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(modified(sequence, add_header("X-Bench", b"1" * (1 << 20))))
    await call.rest()


@breach(EOM, "invalid_reply", r"reply code 250 is not a 5xx code")
async def reject_with_250(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(reject(sequence, 250, "", "ok?"))
    await call.rest()


@breach(EOM, "invalid_reply", r"reply code 451 is not a 5xx code")
async def reject_with_451(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(reject(sequence, 451, "4.7.1", "later"))
    await call.rest()


@breach(EOM, "invalid_reply", r"enhanced code '4\.7\.1' is not 5\.x\.y matching 550")
async def enhanced_code_of_the_wrong_class(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(reject(sequence, 550, "4.7.1", "marked"))
    await call.rest()


@breach(EOM, "invalid_reply", r"reply line 1 contains CR, LF or NUL")
async def reply_line_with_crlf(call: Call) -> None:
    # A second SMTP reply smuggled into the text.
    sequence = (await call.mail_answered()).sequence
    await call.send(reject(sequence, 550, "5.7.1", "no\r\n250 2.0.0 yes"))
    await call.rest()


@breach(EOM, "invalid_reply", r"a reply needs 1 to 32 lines, not 0")
async def reply_without_lines(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(reject(sequence, 550, "5.7.1"))
    await call.rest()


@breach(EOM, "invalid_reply", r"reply line 1 starts with a digit; set enhanced_code")
async def reply_line_starting_with_a_digit(call: Call) -> None:
    # Postfix would read "4.7.1" as the enhanced code of a 550 and drop the milter.
    sequence = (await call.mail_answered()).sequence
    await call.send(reject(sequence, 550, "", "4.7.1 marked"))
    await call.rest()


@breach(EOM, "invalid_reply", r"SKIP is only valid for body_chunk")
async def skip_at_end_of_message(call: Call) -> None:
    sequence = (await call.mail_answered()).sequence
    await call.send(verdict(sequence, pb.ACTION_SKIP))
    await call.rest()


@functools.cache
def huge_answer(sequence: int) -> bytes:
    """A replacement body one byte over the bridge's MAX_ANSWER_SIZE (64 MiB).

    Made once per sequence (rogue.py makes the one for 3 at start): making it copies
    64 MiB several times, which can take longer than the deadline on a busy machine."""
    body = pb.ReplaceBody(body=b"x" * ((64 << 20) + 1))
    return modified(sequence, pb.Modification(replace_body=body))


@breach(EOM, "stream_error", r"stream failed: RESOURCE_EXHAUSTED: .*larger than max")
async def huge_response(call: Call) -> None:
    # gRPC refuses it without holding it whole (the test checks the bridge's peak memory).
    sequence = (await call.mail_answered()).sequence
    await call.send(huge_answer(sequence))
    await call.rest()


# -- tolerated ----------------------------------------------------------------------


@breach(None, None)
async def floods_progress(call: Call) -> None:
    eom = await call.mail_answered()
    await call.send(*[progress(eom.sequence)] * 200, call.good(eom))
    await call.rest()


@breach(None, None)
async def answers_end_of_message_twice(call: Call) -> None:
    answer = call.good(await call.mail_answered())
    await call.send(answer, answer)
    await call.rest()


@breach(None, None, r"policy did not end its stream within 5s; cancelling it")
async def lingers_after_the_half_close(call: Call) -> None:
    await well_behaved(call)
    await asyncio.Event().wait()  # until the bridge cancels the call
