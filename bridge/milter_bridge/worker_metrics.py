"""The metrics of ``--workers N``: each worker writes its own files, the supervisor adds them up.

prometheus-client's multiprocess mode: a worker's metrics write to mapped files
in the supervisor's private folder (one per kind and pid), and the
supervisor's /metrics merges them: counters and histograms summed (those of
workers gone included), ``livesum``/``livemin``/``liveall`` gauges over the live
workers. prometheus-client's multiprocess internals are untyped (pyproject's
mypy override for this module).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess, values
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector


def use_multiprocess_values(folder: str) -> None:
    """Metrics created from now on in this process (a worker) write to files in
    ``folder``, which the supervisor aggregates (prometheus-client's multiprocess mode)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.MultiProcessValue()


class _WorkerFiles(Collector):
    """Every worker's metrics files in ``folder``, merged as prometheus-client's
    MultiProcessCollector does, but without a file a worker is creating: it is empty
    for a moment, and reading it fails (prometheus/client_python#1199)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in self.folder.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size > 0:
                    files.append(str(path))
        merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(files)
        return merged


def aggregated(folder: str, registry: CollectorRegistry) -> Callable[[], bytes]:
    """The supervisor's /metrics: its own ``registry`` and every worker's metrics in
    ``folder``, the counters of workers gone included."""
    registry.register(_WorkerFiles(folder))
    return lambda: generate_latest(registry)


def fold_dead(folder: str, pid: int) -> None:
    """What a dead worker leaves in ``folder``: its live gauges removed; its counters and
    histograms added into one archive file per kind, so that the files do not pile up
    with restarts while the totals stay whole."""
    multiprocess.mark_process_dead(pid, folder)
    for kind in ("counter", "histogram"):
        dead = Path(folder, f"{kind}_{pid}.db")
        if not dead.exists():
            continue
        if dead.stat().st_size > 0:
            archive = MmapedDict(str(Path(folder, f"{kind}_archive.db")))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(dead)):
                    before, _ = archive.read_value(key)
                    archive.write_value(key, before + value, timestamp)
            finally:
                archive.close()
        dead.unlink()
