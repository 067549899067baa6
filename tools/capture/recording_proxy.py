"""Recording TCP proxy for the milter protocol (stdlib only).

The proxy listens on a loopback port; for each connection from an MTA it opens a connection to
the real milter and copies bytes both ways *unchanged* (each recv() chunk is forwarded as is).
Besides forwarding, each direction is split into milter frames

    uint32 length (big-endian, counts the command byte + data) | command byte | data

and every complete frame is recorded, with its direction, in the order the proxy saw it complete.
A frame is recorded before the chunk that completes it is forwarded, so a reply can never be
recorded before the command it answers. The split is deliberately independent of the project's
codec (bridge/): it is the ground truth the codec is tested against.
"""

import contextlib
import socket
import threading
import time


class FrameSplitter:
    """Incremental splitter: feed() bytes, get back the complete frames (length prefix included)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + n:
                break
            frames.append(bytes(self.buf[: 4 + n]))
            del self.buf[: 4 + n]
        return frames

    def leftover(self):
        return bytes(self.buf)


class Recording:
    """All frames of one proxied connection, in order, plus bookkeeping."""

    def __init__(self, index, peer):
        self.index = index
        self.peer = peer
        self.packets = []  # list of (dir, frame bytes), dir in {"mta", "milter"}
        self.errors = []
        self.opened = time.time()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._open_dirs = 2

    def add(self, direction, frames):
        with self.lock:
            for f in frames:
                self.packets.append((direction, f))

    def direction_closed(self):
        with self.lock:
            self._open_dirs -= 1
            if self._open_dirs == 0:
                self.done.set()


class RecordingProxy:
    def __init__(self, listen_host, listen_port, upstream_host, upstream_port, name=""):
        self.listen = (listen_host, listen_port)
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.recordings = []
        self.cond = threading.Condition()
        self._count = 0
        self._stop = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(self.listen)
        self.sock.listen(16)
        self.thread = threading.Thread(
            target=self._accept_loop, daemon=True, name="proxy-%s" % name
        )
        self.thread.start()

    # --- public ------------------------------------------------------------------------------
    def take(self, count, timeout=60.0):
        """Wait until `count` connections were seen and all of them closed; return, forget them."""
        deadline = time.time() + timeout
        with self.cond:
            while len(self.recordings) < count:
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(
                        "%s: %d of %d milter connections seen"
                        % (self.name, len(self.recordings), count)
                    )
                self.cond.wait(min(left, 0.2))
            recs = self.recordings[:count]
        for r in recs:
            if not r.done.wait(max(0.1, deadline - time.time())):
                raise TimeoutError("%s: milter connection %d did not close" % (self.name, r.index))
        with self.cond:
            del self.recordings[:count]
        return recs

    def pending(self):
        with self.cond:
            return len(self.recordings)

    def close(self):
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()

    # --- internals ---------------------------------------------------------------------------
    def _accept_loop(self):
        while not self._stop:
            try:
                client, peer = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError as e:
                client.close()
                print("proxy %s: cannot reach milter %s: %s" % (self.name, self.upstream, e))
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.cond:
                self._count += 1
                rec = Recording(self._count, peer)
                self.recordings.append(rec)
                self.cond.notify_all()
            threading.Thread(
                target=self._pump, args=(rec, client, server, "mta"), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(rec, server, client, "milter"), daemon=True
            ).start()

    @staticmethod
    def _pump(rec, src, dst, direction):
        splitter = FrameSplitter()
        try:
            while True:
                try:
                    data = src.recv(65536)
                except OSError as e:
                    rec.errors.append("%s recv: %s" % (direction, e))
                    data = b""
                if not data:
                    break
                rec.add(direction, splitter.feed(data))
                try:
                    dst.sendall(data)
                except OSError as e:
                    rec.errors.append("%s send: %s" % (direction, e))
                    break
            if splitter.leftover():
                rec.errors.append(
                    "%s: %d trailing bytes of an incomplete frame"
                    % (direction, len(splitter.leftover()))
                )
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        finally:
            rec.direction_closed()
            if rec.done.is_set():
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.close()
