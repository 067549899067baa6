"""Log output: plain lines or JSON (one object per line) for log shippers.

Connection lines carry ``conn`` and, once the MTA has told it, ``qid`` (the
queue id in the MTA's own log); decision lines add ``stage``, ``verdict`` and
``latency_ms``. In plain lines these read ``conn=… qid=…: …``. With
``--workers N`` a worker's lines start with ``worker=I`` (a field in JSON). No line holds
message content (addresses, headers, body): the bridge never logs them.

What the MTA or a policy says (a queue id, a reason in an error) is only ever
an argument or a field, never part of a format string, and the formatters
escape control characters in it (a newline becomes ``\\x0a``): a queue id
such as ``Q1%d`` or one with a newline and a forged line in it is written as it
is, on its own line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(line)s"
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: every control character written as ``\\xNN``."""
    return _CONTROL.sub(_escaped, text)


class PlainFormatter(logging.Formatter):
    """``time LEVEL logger conn=… qid=…: message``, with control characters escaped."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # The connection's prefix (ConnectionLog) is a field, never part of the format.
        worker = getattr(record, "worker", None)
        prefix = "" if worker is None else f"worker={worker} "
        record.line = escape(prefix + getattr(record, "log_prefix", "") + record.getMessage())
        return super().format(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        # A traceback keeps its lines, each indented and escaped: none of them, an
        # exception's message included, can pass for a log line of its own.
        lines = super().formatException(ei).splitlines()
        return "\n".join("  " + escape(line) for line in lines)


# Fields a record may carry (set through ``extra``), in output order.
FIELDS = ("worker", "conn", "qid", "stage", "verdict", "latency_ms", "cause")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = escape(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = escape(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def setup(level: str, fmt: str) -> None:
    """Configure the root logger once, at start."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def in_worker(index: int) -> None:
    """Every line of this process (worker ``index`` of --workers N) says so."""

    def mark(record: logging.LogRecord) -> bool:
        record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(mark)
