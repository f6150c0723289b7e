"""A fake nats-server for tests that need a server sending what a real one never would.

It speaks just enough of the protocol for nats-py to connect (INFO, PONG to each
PING) and records each connection's subscriptions; a test then writes raw bytes
to the latest connection with :meth:`FakeNats.send`. Every connection is kept,
so a test can see that the client dropped one and came back.
"""

from __future__ import annotations

import json
import socket
import threading
import time


class Conn:
    """One client connection to the fake server."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.subs: dict[str, int] = {}
        self.subscribed = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)


class FakeNats:
    def __init__(self, max_payload: int = 1024 * 1024) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self.max_payload = max_payload
        self.conns: list[Conn] = []
        self._new = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "MSIGHT_NATS_SERVERS": self.url,
            "MSIGHT_NATS_RECONNECT_WAIT": "0.1",
            "MSIGHT_NATS_CONNECT_TIMEOUT": "2",
        }

    def wait_conn(self, count: int, timeout: float = 10.0) -> Conn:
        """The ``count``-th connection (1-based) once it has subscribed to something."""
        deadline = time.monotonic() + timeout
        with self._new:
            while len(self.conns) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no connection #{count}")
                self._new.wait(remaining)
            conn = self.conns[count - 1]
        if not conn.subscribed.wait(max(deadline - time.monotonic(), 0.01)):
            raise TimeoutError(f"connection #{count} did not subscribe")
        return conn

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            info = {
                "server_id": "FAKE",
                "version": "2.10.0",
                "proto": 1,
                "headers": True,
                "max_payload": self.max_payload,
                "jetstream": False,
            }
            sock.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
            conn = Conn(sock)
            with self._new:
                self.conns.append(conn)
                self._new.notify_all()
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: Conn) -> None:
        buf = b""
        while True:
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                conn.closed.set()
                return
            buf += data
            while b"\r\n" in buf:
                line, _, rest = buf.partition(b"\r\n")
                op = line.split(b" ", 1)[0].upper()
                if op in (b"PUB", b"HPUB"):
                    size = int(line.split()[-1])
                    if len(rest) < size + 2:
                        break
                    rest = rest[size + 2 :]
                elif op == b"PING":
                    try:
                        conn.send(b"PONG\r\n")
                    except OSError:
                        pass
                elif op == b"SUB":
                    parts = line.split()
                    conn.subs[parts[1].decode()] = int(parts[-1])
                    conn.subscribed.set()
                buf = rest

    def close(self) -> None:
        self._sock.close()
        for conn in self.conns:
            try:
                conn.sock.close()
            except OSError:
                pass
