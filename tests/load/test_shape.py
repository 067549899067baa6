"""The load tool's message shape and its pure parts: marker share, body, macro packets."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milter_bridge.load import Shape, ShapeError
from milter_bridge.load.macros import MacroLists
from milter_bridge.protocol import CommandDecoder
from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol.constants import MacroStage


@pytest.mark.parametrize(
    ("share", "count", "marked"),
    [(Fraction(1, 5), 50, 10), (Fraction(1, 10), 100, 10), (Fraction(1, 3), 100, 33)],
)
def test_the_marker_share_is_exact(share: Fraction, count: int, marked: int) -> None:
    shape = Shape(marker_share=share)
    assert sum(shape.marked(k) for k in range(count)) == marked


@given(
    st.fractions(min_value=0, max_value=1, max_denominator=1000),
    st.integers(0, 5000),
    st.integers(1, 500),
)
def test_any_window_holds_the_share_give_or_take_one(share: Fraction, start: int, n: int) -> None:
    shape = Shape(marker_share=share)
    marked = sum(shape.marked(k) for k in range(start, start + n))
    assert share * n - 1 < marked < share * n + 1
    assert sum(shape.marked(k) for k in range(n)) == share * n // 1


@pytest.mark.parametrize("size", [0, 1, 2, 79, 80, 81, 10240, 70000])
def test_the_body_has_the_asked_size_in_crlf_lines(size: int) -> None:
    body = Shape(body_size=size).body()
    assert len(body) == size
    if size >= 2:
        assert body.endswith(b"\r\n")
        assert b"\n" not in body.replace(b"\r\n", b"")


def test_the_body_is_cut_as_postfix_cuts_it() -> None:
    chunks = Shape(body_size=140_000).body_chunks(65535)
    assert [len(c) for c in chunks] == [65535, 65535, 8930]


@pytest.mark.parametrize("headers", [0, 1, 5, 7, 30])
def test_headers(headers: int) -> None:
    fields = Shape(headers=headers).header_fields()
    assert len(fields) == headers
    assert len({name for name, _ in fields}) == headers
    if headers:
        assert fields[0][0] == b"Subject"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"headers": -1}, "must not be negative"),
        ({"recipients": 0}, "at least 1"),
        ({"marker_share": Fraction(3, 2)}, "between 0 and 1"),
        ({"marker": ""}, "single line"),
        ({"marker": "a\r\nb"}, "single line"),
        ({"headers": 0, "marker_share": Fraction(1, 2)}, "at least one header"),
    ],
)
def test_impossible_shapes(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ShapeError, match=message):
        Shape(**kwargs)  # type: ignore[arg-type]


def test_macro_packets_decode_with_the_codec_and_place_the_queue_id() -> None:
    lists = MacroLists(((MacroStage.SMFIM_ENVRCPT, b"{rcpt_addr} i rcpt_host {nothing}"),))
    values = {b"rcpt_addr": b"a@example.test", b"rcpt_host": b"example.test"}
    packet = lists.packet(b"R", values)
    (without,) = CommandDecoder().feed(packet.packet(b""))
    (with_id,) = CommandDecoder().feed(packet.packet(b"4F2A"))
    assert without == cmd.DefineMacro(
        b"R", ((b"{rcpt_addr}", b"a@example.test"), (b"rcpt_host", b"example.test"))
    )
    assert with_id == cmd.DefineMacro(
        b"R",
        ((b"{rcpt_addr}", b"a@example.test"), (b"i", b"4F2A"), (b"rcpt_host", b"example.test")),
    )
