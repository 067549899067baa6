"""The MTA listen socket, bound before any worker or event loop exists.

One bound socket serves every worker: with ``--workers N`` the supervisor binds
it and each worker inherits it and accepts from it, so the kernel's one
accept queue feeds all of them, a worker that dies leaves the queue to the
others, and inet, inet6 and unix listeners all work the same way
(SO_REUSEPORT would give each worker a queue of its own, lost with it, and
does nothing for unix sockets).
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from milter_bridge.config import Config, Listen, ListenKind

BACKLOG = 100  # asyncio's default; Postfix opens a milter connection per SMTP session


class ListenError(Exception):
    """The socket cannot be bound; the message names the setting and why."""


@dataclass
class Listener:
    sock: socket.socket
    listen: Listen
    inode: int = -1  # of a unix socket's file, to remove only our own at the end

    @property
    def address(self) -> str:
        """The listen address with the real port (when the configured port was 0)."""
        listen = self.listen
        if listen.kind is ListenKind.UNIX:
            return str(listen)
        port = self.sock.getsockname()[1]
        host = f"[{listen.host}]" if listen.kind is ListenKind.INET6 else listen.host
        return f"{listen.kind.value}:{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def remove(self) -> None:
        """Remove a unix socket's file unless a later instance has replaced it."""
        if self.listen.kind is not ListenKind.UNIX:
            return
        path = Path(self.listen.path)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == self.inode:
                path.unlink()


def bind(config: Config) -> Listener:
    listen = config.listen
    try:
        if listen.kind is ListenKind.UNIX:
            return _bind_unix(config, Path(listen.path))
        family = socket.AF_INET6 if listen.kind is ListenKind.INET6 else socket.AF_INET
        sock = socket.create_server(
            (listen.host, listen.port), family=family, backlog=BACKLOG, reuse_port=False
        )
    except OSError as exc:  # e.g. the address is taken
        msg = f"--listen {listen}: {exc.strerror or exc}"
        raise ListenError(msg) from exc
    sock.setblocking(False)
    return Listener(sock, listen)


def _bind_unix(config: Config, path: Path) -> Listener:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            msg = f"--listen: {path} exists and is not a socket"
            raise ListenError(msg)
        if _in_use(path):
            msg = f"--listen: another process listens on {path}"
            raise ListenError(msg)
        path.unlink()  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
        if config.socket_group is not None:
            os.chown(path, -1, grp.getgrnam(config.socket_group).gr_gid)
        if config.socket_mode is not None:
            path.chmod(config.socket_mode)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return Listener(sock, config.listen, path.stat().st_ino)


def _in_use(path: Path) -> bool:
    """Whether a process accepts connections on this unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # e.g. a full backlog: somebody listens
            return True
    return True
