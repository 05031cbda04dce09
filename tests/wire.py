"""A recording TCP proxy in front of PostgreSQL, for tests that count round trips on the wire.

It forwards bytes both ways (threads, no TLS: clients connect with sslmode=disable) and records what the
client sends. A round trip is a message after which the client waits for the server: a simple query ('Q',
what psycopg2 sends for every statement, and for BEGIN, COMMIT and ROLLBACK) or, in the extended protocol,
a Sync ('S'). bench/pgwire.py counts the same for the benchmark, in a process of its own.
"""

from __future__ import annotations

import socket
import struct
import threading

from sqlalchemy.engine import make_url

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class WireRecorder:
    """``trips``: one entry per round trip, in order: the query's text for 'Q', ``"<sync>"`` for 'S'."""

    def __init__(self, host: str, port: int) -> None:
        self.server = (host, port)
        self.trips: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="wire-recorder").start()

    def url(self, url: str) -> str:
        """``url`` pointed at this proxy."""
        u = make_url(url)
        return u.set(host="127.0.0.1", port=self.port, query={**u.query, "sslmode": "disable"}).render_as_string(
            hide_password=False)

    def mark(self) -> int:
        with self._lock:
            return len(self.trips)

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.trips[mark:]

    def close(self) -> None:
        for s in [self._listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.server)
            self._sockets += [client, server]
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(server, client), daemon=True).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:  # startup: untyped messages, until the StartupMessage itself
                head = _read_exactly(client, 4)
                body = _read_exactly(client, struct.unpack("!I", head)[0] - 4)
                server.sendall(head + body)
                if struct.unpack("!I", body[:4])[0] not in (SSL_REQUEST, GSSENC_REQUEST):
                    break
            while True:
                kind = _read_exactly(client, 1)
                head = _read_exactly(client, 4)
                body = _read_exactly(client, struct.unpack("!I", head)[0] - 4)
                if kind in (b"Q", b"S"):  # recorded before it is forwarded: before the client can see an answer
                    with self._lock:
                        self.trips.append(body.rstrip(b"\0").decode() if kind == b"Q" else "<sync>")
                server.sendall(kind + head + body)
        except (ConnectionError, OSError):
            pass
        finally:
            server.close()

    @staticmethod
    def _server_to_client(server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(65536):
                client.sendall(data)
        except (ConnectionError, OSError):
            pass
        finally:
            client.close()
