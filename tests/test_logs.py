"""The log formatters: what comes from the MTA or a policy is data, on one line."""

from __future__ import annotations

import json
import logging
import sys

from milter_bridge.logs import JsonFormatter, PlainFormatter, escape


def record(msg: str, *args: object, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "milter_bridge.connection", logging.WARNING, __file__, 1, msg, args, None
    )
    rec.__dict__.update(fields)
    return rec


def test_escape_writes_control_characters_as_codes() -> None:
    assert escape("a\nb\rc\x1b[31m\x00\x7f\x85\u2028 ü%d") == (
        "a\\x0ab\\x0dc\\x1b[31m\\x00\\x7f\\x85\\u2028 ü%d"
    )


def test_the_connection_prefix_is_a_field_not_part_of_the_format() -> None:
    prefix = "conn=1 qid=Q1%d\nERROR forged: "
    rec = record("policy failure at %s", "rcpt_to", log_prefix=prefix, qid="Q1%d\nERROR forged")
    line = PlainFormatter().format(rec)
    assert line.endswith(
        " WARNING milter_bridge.connection conn=1 qid=Q1%d\\x0aERROR forged: "
        "policy failure at rcpt_to"
    )
    assert "\n" not in line
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "policy failure at rcpt_to"
    assert out["qid"] == "Q1%d\\x0aERROR forged"


def test_a_traceback_cannot_pass_for_log_lines() -> None:
    try:
        msg = "bad\n2026-12-04 10:00:00,000 ERROR milter_bridge forged"
        raise ValueError(msg)
    except ValueError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    first, *rest = PlainFormatter().format(rec).splitlines()
    assert first.endswith("WARNING milter_bridge.connection failed")
    assert rest[0] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in rest), rest
    assert "  2026-12-04 10:00:00,000 ERROR milter_bridge forged" in rest
