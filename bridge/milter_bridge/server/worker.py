"""One worker of ``--workers N``: ``python -m milter_bridge.server.worker FOLDER INDEX
LISTEN_FD ALIVE_FD SENTINEL_FD``, started by the supervisor (server/workers.py), not by hand.

It serves the supervisor's listen socket (LISTEN_FD) as worker INDEX with the
Config the supervisor left in FOLDER, its slot on the board there, and its
metrics in files there. It stops on SIGTERM, or when ALIVE_FD (a pipe whose
other end only the supervisor holds) ends. SENTINEL_FD is only held open: it
ends when this process does, which tells the supervisor.
"""

from __future__ import annotations

import pickle
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from milter_bridge import logs
from milter_bridge.config import Config
from milter_bridge.server.board import Board
from milter_bridge.server.bridge import Place, run, serve
from milter_bridge.server.listener import Listener
from milter_bridge.worker_metrics import use_multiprocess_values

BOARD = "board"
CONFIG = "config.pickle"


@dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor hands every worker through its private folder."""

    config: Config
    inode: int  # of a unix listen socket's file (the supervisor's to remove)


def main(argv: list[str]) -> int:
    folder, index, listen_fd, alive_fd, _sentinel_fd = argv
    path = Path(folder)
    # Written by our own supervisor into its 0700 folder: trusted input.
    setup: WorkerSetup = pickle.loads((path / CONFIG).read_bytes())  # noqa: S301
    config = setup.config
    logs.setup(config.log_level, config.log_format)
    logs.in_worker(int(index))
    use_multiprocess_values(folder)
    sock = socket.socket(fileno=int(listen_fd))
    sock.setblocking(False)
    listener = Listener(sock, config.listen, setup.inode)
    place = Place(Board.attach(path / BOARD, config.workers), int(index))
    run(serve(config, listener, place, int(alive_fd)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
