"""A counting TCP proxy in front of PostgreSQL: the wire-level check of bench/sqlcount.py's figures.

    python -m bench.pgwire LISTEN_PORT SERVER_HOST SERVER_PORT COUNTS_FILE

It forwards bytes both ways and parses what the client sends. A round trip is a message after which the
client waits for the server: a simple query ('Q', what psycopg2 sends for every statement, BEGIN, COMMIT
and ROLLBACK) or, in the extended protocol, a Sync ('S'). Every 0.2 s it writes the counts as JSON to
COUNTS_FILE. Clients must not negotiate TLS through it (sslmode=disable).
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from pathlib import Path

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104

# "no_flush_wait": the queries among them whose commit does not wait for the WAL flush (store/fastpath.py's
# NO_FLUSH_WAIT prefix): every other query on an autocommit connection is a durable commit, or a read.
# "fast": the queries that execute one of the fast path's prepared statements (the hot path's transitions);
# "others": the rest, counted by their first words (a connection's PREPAREs, a worker's timers: its liveness
# heartbeat, the sweeper), up to 100 distinct ones.
NO_FLUSH_WAIT = b"SET LOCAL synchronous_commit = off;"
FAST = b"EXECUTE sagaflow_"
counts: dict = {"query": 0, "sync": 0, "other": 0, "connections": 0, "no_flush_wait": 0, "fast": 0, "others": {}}


def _note_other(what: str) -> None:
    if what in counts["others"] or len(counts["others"]) < 100:
        counts["others"][what] = counts["others"].get(what, 0) + 1


def _note_query(body: bytes) -> None:
    text = body[len(NO_FLUSH_WAIT):].lstrip() if body.startswith(NO_FLUSH_WAIT) else body
    if body.startswith(NO_FLUSH_WAIT):
        counts["no_flush_wait"] += 1
    if text.startswith(FAST):
        counts["fast"] += 1
    else:
        _note_other(" ".join(text.decode(errors="replace").split())[:60])


async def _client_to_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:  # startup: untyped messages, until the StartupMessage itself
        head = await reader.readexactly(4)
        body = await reader.readexactly(struct.unpack("!I", head)[0] - 4)
        writer.write(head + body)
        await writer.drain()
        if struct.unpack("!I", body[:4])[0] not in (SSL_REQUEST, GSSENC_REQUEST):
            break
    while True:
        kind = await reader.readexactly(1)
        head = await reader.readexactly(4)
        body = await reader.readexactly(struct.unpack("!I", head)[0] - 4)
        counts["query" if kind == b"Q" else "sync" if kind == b"S" else "other"] += 1
        if kind == b"Q":
            _note_query(body)
        elif kind == b"S":
            _note_other("(a Sync of the extended protocol)")
        writer.write(kind + head + body)
        await writer.drain()


async def _server_to_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _serve(client_reader, client_writer, host: str, port: int) -> None:
    counts["connections"] += 1
    server_reader, server_writer = await asyncio.open_connection(host, port)

    async def run(coro, closes):
        try:
            await coro
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            closes.close()

    await asyncio.gather(run(_client_to_server(client_reader, server_writer), server_writer),
                         run(_server_to_client(server_reader, client_writer), client_writer))


async def main(listen_port: int, host: str, port: int, counts_file: Path) -> None:
    server = await asyncio.start_server(lambda r, w: _serve(r, w, host, port), "127.0.0.1", listen_port)

    async def dump():
        while True:
            tmp = counts_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(counts))
            tmp.replace(counts_file)
            await asyncio.sleep(0.2)

    async with server:
        await asyncio.gather(server.serve_forever(), dump())


def read_counts(counts_file: Path) -> dict:
    return json.loads(counts_file.read_text())


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
