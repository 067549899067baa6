"""Header modifications through real MTAs: the delivered header block, exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from milter_bridge.v1 import policy_pb2 as pb
from tests.conformance.conftest import World
from tests.conformance.mods import M, at_end, block, modified
from tests.conformance.smtp import Message, send

pytestmark = pytest.mark.asyncio(loop_scope="session")

R, FROM, TO, SUBJ = (
    ("Received", ""),
    ("From", "sender@example.test"),
    ("To", "rcpt@example.test"),
    ("Subject", "test"),
)
XA, REP1, REP2, XB = ("X-A", "1"), ("X-Rep", "first"), ("X-Rep", "second"), ("X-B", "2")
# What each MTA adds to a message from a client in mynetworks, and where: Postfix
# after the client's headers, Sendmail right after its Received:.
MTA_ADDED = {
    "postfix": [("Message-Id", ""), ("Date", "")],
    "sendmail": [("Date", ""), ("Message-Id", "")],
}


def expected(
    mta: str, *middle: tuple[str, str], top: tuple[tuple[str, str], ...] = (R,)
) -> list[tuple[str, str]]:
    client = [FROM, TO, SUBJ, *middle]
    if mta == "sendmail":
        return [*top, *MTA_ADDED[mta], *client]
    return [*top, *client, *MTA_ADDED[mta]]


Want = Callable[[str], list[tuple[str, str]]]
CASES: dict[str, tuple[list[pb.Modification], Want]] = {
    "add": (
        [M(add_header=pb.AddHeader(name="X-Added", value=b"yes"))],
        lambda m: [*expected(m, XA, REP1, REP2, XB), ("X-Added", "yes")],
    ),
    "change-first": (
        [M(change_header=pb.ChangeHeader(name="X-Rep", index=1, value=b"new"))],
        lambda m: expected(m, XA, ("X-Rep", "new"), REP2, XB),
    ),
    "change-second": (
        [M(change_header=pb.ChangeHeader(name="X-Rep", index=2, value=b"new"))],
        lambda m: expected(m, XA, REP1, ("X-Rep", "new"), XB),
    ),
    # An occurrence the message lacks: both MTAs add the header (policy.proto),
    # Postfix at the end, Sendmail (headers.c addheader()) in front of the first
    # header of that name, or at the end when there is none (next case).
    "change-beyond-the-last": (
        [M(change_header=pb.ChangeHeader(name="X-Rep", index=3, value=b"third"))],
        lambda m: (
            [*expected(m, XA, REP1, REP2, XB), ("X-Rep", "third")]
            if m == "postfix"
            else expected(m, XA, ("X-Rep", "third"), REP1, REP2, XB)
        ),
    ),
    "change-absent-name": (
        [M(change_header=pb.ChangeHeader(name="X-None", index=1, value=b"new"))],
        lambda m: [*expected(m, XA, REP1, REP2, XB), ("X-None", "new")],
    ),
    "delete-one": (
        [M(delete_header=pb.DeleteHeader(name="X-Rep", index=1))],
        lambda m: expected(m, XA, REP2, XB),
    ),
    # Several occurrences go in decreasing index order (indices count the received message).
    "delete-all": (
        [
            M(delete_header=pb.DeleteHeader(name="X-Rep", index=2)),
            M(delete_header=pb.DeleteHeader(name="X-Rep", index=1)),
        ],
        lambda m: expected(m, XA, XB),
    ),
}

# Both MTAs count their own Received: header (which the policy never sees):
# index 0 lands above it, 1 just below it.
INSERTED = ("X-Ins", "v")
INSERT_TOP = {0: (INSERTED, R), 1: (R, INSERTED)}


@pytest.mark.parametrize("case", list(CASES))
async def test_header_modifications(fresh: World, mta_name: str, case: str) -> None:
    mods, want = CASES[case]
    delivered = await modified(fresh, mta_name, *mods)
    assert block(delivered) == want(mta_name)


@pytest.mark.parametrize("index", [0, 1])
async def test_insert_header(fresh: World, mta_name: str, index: int) -> None:
    insert = M(insert_header=pb.InsertHeader(index=index, name="X-Ins", value=b"v"))
    delivered = await modified(fresh, mta_name, insert)
    assert block(delivered) == expected(mta_name, XA, REP1, REP2, XB, top=INSERT_TOP[index])


async def test_eight_bit_and_large_headers_pass_byte_exact(fresh: World, mta_name: str) -> None:
    eight_bit = "Grüße aus Köln".encode()
    # 50 KB: neither MTA hands a milter a 100 KB header. Postfix 3.7 silently cuts
    # one header at about 59.5 KB; Sendmail refuses milter packets over 64 KB
    # ("milter_write: length ... out of range") and tempfails the message.
    big = b" ".join([b"word%05d" % n for n in range(5_000)])
    folded = b"\r\n\t".join(big[i : i + 900] for i in range(0, len(big), 900))
    seen: list[pb.Header] = []

    async def record(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "header":
            seen.append(request.header)
        return [
            pb.ProcessResponse(
                sequence=request.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
            )
        ]

    fresh.policy.decide = record
    message = Message(headers=[("X-Eight", eight_bit), ("X-Big", folded)])
    assert (await send(fresh.mtas[mta_name].port, message)).accepted
    delivered = await fresh.sink.next()
    by_name = {h.name: h.value for h in seen}
    assert by_name["X-Eight"] == eight_bit  # the policy got the bytes as sent
    assert by_name["X-Big"] == folded.replace(b"\r\n", b"\n")  # folding as milter carries it
    raw = delivered.data
    assert b"X-Eight: " + eight_bit + b"\r\n" in raw
    assert b"X-Big: " + folded + b"\r\n" in raw


async def test_leading_space_as_libmilter_has_it(fresh: World, mta_name: str) -> None:
    # Without HDR_LEADSPC both MTAs remove the one space after the colon from what
    # the policy sees, and add one to what the policy adds; the message keeps its own.
    seen: dict[str, bytes] = {}

    async def record_and_add(request: pb.ProcessRequest) -> list[pb.ProcessResponse]:
        if request.WhichOneof("event") == "header":
            seen[request.header.name] = request.header.value
        if request.WhichOneof("event") == "end_of_message":
            return await at_end(M(add_header=pb.AddHeader(name="X-New", value=b"added")))(request)
        return [
            pb.ProcessResponse(
                sequence=request.sequence, verdict=pb.Verdict(action=pb.ACTION_CONTINUE)
            )
        ]

    fresh.policy.decide = record_and_add
    message = Message(headers=[("X-Spaced", b"  two spaces"), ("X-Tab", b"\ttab")])
    assert (await send(fresh.mtas[mta_name].port, message)).accepted
    delivered = await fresh.sink.next()
    # On the wire: "X-Spaced:   two spaces" and "X-Tab: \ttab" (Message adds ": ").
    assert seen["X-Spaced"] == b"  two spaces"  # exactly one space removed
    assert seen["X-Tab"] == b"\ttab"
    assert b"\r\nX-Spaced:   two spaces\r\n" in delivered.data
    assert b"\r\nX-New: added\r\n" in delivered.data
