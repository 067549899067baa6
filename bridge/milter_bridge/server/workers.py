"""``--workers N``: a supervisor and N worker processes sharing one listen socket.

The supervisor binds the MTA listener and the metrics socket, then starts the
workers. It never creates a gRPC object. Each worker is a fresh interpreter
(``python -m milter_bridge.server.worker``, fork and exec) that inherits only
the listen socket and two pipes, and builds its own gRPC channel. A plain fork
would be fork-safe for gRPC as well, but the worker would hold copies of
whatever the supervisor had open at that moment: an HTTP connection to
/metrics then stays open, unanswered, until that worker ends (seen). The
kernel hands each new MTA connection to one worker from the shared accept
queue.

- A worker that dies is logged and replaced; its MTA connections die with it
  (their MTAs apply their milter default action). A worker that dies soon after
  it started is replaced after a growing pause, so a worker that cannot start
  does not spin.
- SIGTERM or SIGINT: the supervisor closes its copy of the listener and passes
  SIGTERM on; each worker drains within ``--grace-period`` as a single process
  does; a worker still there 10 s after that is killed.
- SIGHUP is logged and ignored, here and in the workers.
- /metrics aggregates the workers (prometheus-client's multiprocess mode);
  /readyz is 200 only when every worker is running and ready.
- A worker whose supervisor is gone (its pipe ends) drains and stops.
- What a worker needs besides the descriptors (the Config, the board, the
  metrics files) lies in a private folder (mkdtemp, 0700), removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from milter_bridge.config import Config
from milter_bridge.metrics import HttpEndpoint
from milter_bridge.server.board import Board
from milter_bridge.server.bridge import SIGNALS, StartError, mta_settings, run
from milter_bridge.server.listener import Listener, ListenError, bind
from milter_bridge.server.worker import BOARD, CONFIG, WorkerSetup
from milter_bridge.worker_metrics import aggregated, fold_dead

log = logging.getLogger("milter_bridge")

KILL_AFTER = 10.0  # beyond the grace period, for a worker that does not stop
QUICK_DEATH = 10.0  # a worker dead sooner than this after its start is replaced after a pause
FIRST_PAUSE, MAX_PAUSE = 0.5, 30.0
CLEAN_EXIT_PAUSE = 1.0  # before starting another after a worker that exited 0


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    sentinel: int  # read end of a pipe only the worker holds open: EOF when it is gone
    started: float
    gone: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def pid(self) -> int:
        return self.process.pid


def supervise(config: Config) -> None:
    """Run the bridge as a supervisor and ``config.workers`` workers, until SIGTERM."""
    # Until run() has its handlers: a signal while binding waits (bridge.run explains).
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    metrics_sock = _metrics_socket(config)  # first, as in one process: then the listener
    try:
        listener = bind(config)
    except ListenError as exc:
        if metrics_sock is not None:
            metrics_sock.close()
        raise StartError(str(exc)) from exc
    folder = Path(tempfile.mkdtemp(prefix="milter-bridge-workers-"))
    try:
        board = Board.create(folder / BOARD, config.workers)
        (folder / CONFIG).write_bytes(pickle.dumps(WorkerSetup(config, listener.inode)))
        log.info(
            "listening on %s, policy at %s, %d workers",
            listener.address,
            config.upstream,
            config.workers,
        )
        for line in mta_settings(listener.address):
            log.info("%s", line)
        try:
            run(Supervisor(config, listener, board, folder, metrics_sock).run())
        finally:
            board.close()
    finally:
        listener.sock.close()
        listener.remove()
        shutil.rmtree(folder, ignore_errors=True)


def _metrics_socket(config: Config) -> socket.socket | None:
    if config.metrics_address is None:
        return None
    host, port = config.metrics_address
    try:
        sock = socket.create_server((host, port), family=_family(host))
    except OSError as exc:
        msg = f"--metrics-listen {config.metrics_listen}: {exc.strerror or exc}"
        raise StartError(msg) from exc
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics and health on http://%s:%d/", shown, sock.getsockname()[1])
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Supervisor:
    def __init__(
        self,
        config: Config,
        listener: Listener,
        board: Board,
        folder: Path,
        metrics_sock: socket.socket | None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.board = board
        self.folder = folder
        self.metrics_sock = metrics_sock
        self.workers: dict[int, Worker] = {}
        self.pauses = dict.fromkeys(range(config.workers), 0.0)
        self.stopping = False
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "milter_bridge_worker_restarts",
            "Workers started again after one died",
            registry=self.registry,
        )
        live = Gauge("milter_bridge_workers", "Worker processes running", registry=self.registry)
        live.set_function(lambda: len(self.workers))
        # Held open here only: each worker watches the read end and stops when it ends.
        self.alive_r, self.alive_w = os.pipe()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP ignored: nothing is reloaded")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        render = aggregated(str(self.folder), self.registry)
        http = None
        if self.metrics_sock is not None:
            http = HttpEndpoint(render, self._ready)
            await http.start("", 0, sock=self.metrics_sock)
        for index in range(self.config.workers):
            self._start(index)
        await stop.wait()
        log.info("signal received: stopping %d workers", len(self.workers))
        self.stopping = True  # /readyz: 503 from now; /metrics and /healthz go on
        self.listener.sock.close()  # the socket closes when the last worker closes its copy
        await self._stop_workers()
        if http is not None:
            await http.stop()
        os.close(self.alive_w)
        os.close(self.alive_r)
        log.info("stopped")

    def _ready(self) -> bool:
        return (
            not self.stopping
            and len(self.workers) == self.config.workers
            and all(self.board.ready(i) for i in self.workers)
        )

    def _start(self, index: int) -> None:
        if self.stopping:
            return
        sentinel_r, sentinel_w = os.pipe()
        listener = self.listener.sock.fileno()
        argv = [sys.executable, "-m", "milter_bridge.server.worker", str(self.folder), str(index)]
        argv += [str(fd) for fd in (listener, self.alive_r, sentinel_w)]
        # The worker starts with these signals blocked (kept across exec) and takes
        # them once its handlers are in place; here they wait for a moment.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv, stdin=subprocess.DEVNULL, pass_fds=(listener, self.alive_r, sentinel_w)
            )
        except OSError as exc:  # e.g. EAGAIN: out of processes or memory for now
            os.close(sentinel_r)
            log.error("cannot start worker %d: %s; trying again in %gs", index, exc, MAX_PAUSE)
            asyncio.get_running_loop().call_later(MAX_PAUSE, self._start, index)
            return
        finally:
            os.close(sentinel_w)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        worker = Worker(index, child, sentinel_r, time.monotonic())
        self.workers[index] = worker
        asyncio.get_running_loop().add_reader(sentinel_r, self._gone, worker)
        log.info("worker %d started (pid %d)", index, child.pid)

    def _gone(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.sentinel)
        os.close(worker.sentinel)
        status = worker.process.wait()
        del self.workers[worker.index]
        self.board.clear(worker.index)
        try:
            fold_dead(str(self.folder), worker.pid)
        except Exception:  # its metrics are not worth a worker: go on and start another
            log.exception("the metrics files of worker %d (pid %d)", worker.index, worker.pid)
        worker.gone.set_result(status)
        how = _exit_status(status)
        if self.stopping:
            log.info("worker %d (pid %d) %s", worker.index, worker.pid, how)
            return
        pause = next_pause(self.pauses[worker.index], time.monotonic() - worker.started)
        self.pauses[worker.index] = pause
        if status == 0:
            # It drained and stopped on a signal of its own. systemd (KillMode=control-group)
            # or a Ctrl-C signals every process at once: the supervisor's own signal is
            # due, and then no worker is started again.
            pause = max(pause, CLEAN_EXIT_PAUSE)
            log.warning(
                "worker %d (pid %d) stopped on its own; starting another in %gs",
                worker.index,
                worker.pid,
                pause,
            )
        else:
            log.error(
                "worker %d (pid %d) %s; its MTA connections are lost; starting another%s",
                worker.index,
                worker.pid,
                how,
                f" in {pause:g}s" if pause else "",
            )
        self.restarts.inc()
        loop.call_later(pause, self._start, worker.index)

    async def _stop_workers(self) -> None:
        waiting = [w.gone for w in self.workers.values()]
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=self.config.grace_period + KILL_AFTER)
        if late:
            for worker in list(self.workers.values()):
                log.warning("worker %d (pid %d) did not stop: killed", worker.index, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            await asyncio.wait(late, timeout=5)


def next_pause(previous: float, lived: float) -> float:
    """None after a worker that ran a while; after one that died young, 0.5 s, doubling."""
    return min(max(previous * 2, FIRST_PAUSE), MAX_PAUSE) if lived < QUICK_DEATH else 0.0


def _exit_status(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name of its own
        name = f"signal {-returncode}"
    return f"was killed by {name}"
