"""``milter-bridge load``: an MTA-side load and conformance client for any milter.

    report = await run(LoadConfig("inet:127.0.0.1:8890", count=1000, concurrency=8))

One asyncio loop plays Postfix 3.7 against the milter (shape.py: the messages;
macros.py and plan.py: what is sent after a negotiation; verdicts.py: which
answers are valid where; abandon.py: which messages the MTA leaves mid-way;
wire.py and client.py: the connection; run.py: the workers; stats.py and
report.py: what is counted and shown; command.py: the CLI).
"""

from milter_bridge.load.report import Report
from milter_bridge.load.run import LoadConfig, LoadConfigError, run, run_sync
from milter_bridge.load.shape import Shape, ShapeError

__all__ = ["LoadConfig", "LoadConfigError", "Report", "Shape", "ShapeError", "run", "run_sync"]
