"""Which messages the load tool abandons, where, and the settings that choose them."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milter_bridge.load import LoadConfig, LoadConfigError, Shape
from milter_bridge.load.abandon import Abandon
from milter_bridge.load.plan import Plan
from milter_bridge.load.verdicts import Stage
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ProtocolFlag
from tests.load.fake_milter import optneg

P = ProtocolFlag
EVERY_POINT = (Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.HEADER, Stage.EOH, Stage.BODY, Stage.EOM)


def abandoned(share: Fraction, count: int, points: tuple[Stage, ...] = EVERY_POINT) -> list[int]:
    abandon = Abandon(share)
    return [k for k in range(count) if abandon.point(k, points) is not None]


def test_every_kth_message_one_before_the_marked_one() -> None:
    assert abandoned(Fraction(1, 10), 100) == list(range(8, 100, 10))
    marked = [k for k in range(100) if Shape(marker_share=Fraction(1, 10)).marked(k)]
    assert marked == list(range(9, 100, 10))
    assert abandoned(Fraction(1, 2), 10) == [0, 2, 4, 6, 8]
    assert abandoned(Fraction(0), 1000) == []
    assert abandoned(Fraction(1), 5) == [0, 1, 2, 3, 4]


@given(
    st.fractions(min_value=0, max_value=1, max_denominator=1000),
    st.integers(0, 5000),
    st.integers(1, 500),
)
def test_any_window_holds_the_share_give_or_take_one(share: Fraction, start: int, n: int) -> None:
    picked = len(abandoned(share, start + n)) - len(abandoned(share, start))
    assert share * n - 1 < picked < share * n + 1


@given(st.integers(2, 60), st.integers(2, 60))
def test_shares_1_over_n_never_hide_the_marked_or_the_abandoned_messages(n: int, m: int) -> None:
    window = 2 * math.lcm(n, m)
    marked = {k for k in range(window) if Shape(marker_share=Fraction(1, n)).marked(k)}
    picked = set(abandoned(Fraction(1, m), window))
    assert marked - picked
    assert picked - marked
    if n == m:
        assert not marked & picked


def test_the_points_come_in_turn_from_the_first_abandoned_message() -> None:
    abandon = Abandon(Fraction(1, 3))
    points = [abandon.point(k, EVERY_POINT) for k in range(60)]
    assert [p for p in points if p is not None] == [*EVERY_POINT, *EVERY_POINT, *EVERY_POINT[:6]]
    two = (Stage.HEADER, Stage.EOM)
    assert [p for k in range(12) if (p := abandon.point(k, two))] == [*two, *two]


def test_labels() -> None:
    assert Abandon(Fraction(1), "rst").label(Stage.HEADER) == "abandoned header rst"
    assert Abandon(Fraction(1)).label(Stage.EOM) == "abandoned eom fin"


@pytest.mark.parametrize(
    ("negotiation", "shape", "points"),
    [
        (optneg(), Shape(), EVERY_POINT),
        (
            optneg(int(P.SMFIP_NOMAIL | P.SMFIP_NORCPT | P.SMFIP_NOBODY | P.SMFIP_NR_HDR)),
            Shape(),
            (Stage.DATA, Stage.HEADER, Stage.EOH, Stage.EOM),
        ),
        (optneg(version=2), Shape(), tuple(p for p in EVERY_POINT if p is not Stage.DATA)),
        (optneg(int(P.SMFIP_NOEOH)), Shape(headers=0, body_size=0), (*EVERY_POINT[:3], Stage.EOM)),
    ],
)
def test_only_the_points_the_negotiation_reaches(
    negotiation: r.OptionNegotiationReply, shape: Shape, points: tuple[Stage, ...]
) -> None:
    assert Plan(negotiation, shape).abandon_points == points


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"abandon": "reset"}, "--abandon must be fin or rst, not 'reset'"),
        ({"abandon": "FIN"}, "--abandon must be fin or rst"),
        ({"abandon_share": Fraction(3, 2)}, "--abandon-share must be between 0 and 1, not 1.5"),
        ({"abandon_share": Fraction(-1, 10)}, "--abandon-share must be between 0 and 1"),
        ({"abandon_share": 0.1}, "--abandon-share must be a Fraction such as Fraction(1, 10)"),
    ],
)
def test_impossible_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LoadConfigError, match=re.escape(message)):
        LoadConfig("inet:127.0.0.1:1", count=1, **kwargs)  # type: ignore[arg-type]


def test_the_defaults_abandon_nothing() -> None:
    default = LoadConfig("inet:127.0.0.1:1", count=1)
    assert (default.abandon_share, default.abandon) == (Fraction(0), "fin")
