"""Log output: plain lines or JSON (one object per line) for log shippers.

Connection lines carry ``conn`` and, once the MTA has told it, ``qid`` (the
queue id in the MTA's own log); decision lines add ``stage``, ``verdict`` and
``latency_ms``. In plain lines these read ``conn=… qid=…: …``. No line holds
message content (addresses, headers, body): the bridge never logs them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Fields a record may carry (set through ``extra``), in output order.
FIELDS = ("conn", "qid", "stage", "verdict", "latency_ms", "cause")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        prefix = getattr(record, "log_prefix", "")
        if prefix and message.startswith(prefix):
            message = message[len(prefix) :]  # the plain prefix repeats conn and qid
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str, fmt: str) -> None:
    """Configure the root logger once, at start."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
