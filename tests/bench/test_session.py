"""bench/session.py with tiny settings: the benchmark message gets the benchmark policy's
answer through the session (checked inside), and a figure is printed. No time asserted."""

from __future__ import annotations

import pytest

from bench import session
from milter_bridge.protocol import replies as r


def test_the_benchmark_message_is_answered_and_measured(capsys: pytest.CaptureFixture[str]) -> None:
    assert session.main(["--messages", "20", "--batches", "2"]) == 0
    assert "µs per message (best of 2 batches)" in capsys.readouterr().out


def test_a_wrong_answer_stops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "EXPECTED", [r.Accept()])
    with pytest.raises(SystemExit, match="the session answered"):
        session.main(["--messages", "1", "--batches", "1"])
