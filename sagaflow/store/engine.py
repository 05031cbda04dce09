"""Engines and connections: the pools, the pings that replace a connection the server dropped, the
transaction a read runs in, and the schema check. Every concern of the store (runs.py, claims.py, ...)
reaches the database through the ``Engines`` part of ``Store`` defined here."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError

from sagaflow.errors import SchemaMissing
from sagaflow.model import clock
from sagaflow.store import tables as t
from sagaflow.store.fastpath import FastPath


def utcnow() -> dt.datetime:
    return clock.now()  # the wall clock, or the one sagaflow.testing moves (model/clock.py)


def create_db_engine(url: str, autocommit: bool = False) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)  # a fresh SAGAFLOW_HOME
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # Let SQLAlchemy issue BEGIN itself (below): pysqlite's implicit BEGIN is deferred, and a
            # deferred read-then-write transaction fails with "database is locked" under concurrency.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if not autocommit:
        # The transactions of the rare paths and of operator requests: a connection the server dropped
        # (restart, pg_terminate_backend) is replaced before use, for one round trip per checkout.
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=5)
    _ping_when_idle(engine)
    return engine


IDLE_PING_SECONDS = 10.0


def _ping_when_idle(engine: Engine) -> None:
    """The hot path's engine: replace a pooled connection the server dropped (restart, idle timeout,
    pg_terminate_backend) before using it. pool_pre_ping would cost a round trip at every checkout, as much
    as a whole transition; this pings only a connection that sat idle. One that drops while busy raises:
    a task's database-outage retry takes over, and a read is tried again (Engines._read)."""

    @event.listens_for(engine, "checkin")
    def _idle_since(dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, proxy):
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as exc:  # the driver's OperationalError / InterfaceError
            raise DisconnectionError(str(exc)) from exc  # the pool retries with a new connection


class Engines:
    """The store's connections: ``engine`` for transactions; on PostgreSQL also ``autocommit`` (one round
    trip per read) and ``fast``, the success path's transitions as one prepared statement each
    (fastpath.py). A concern's method that has a fast statement asks ``if self.fast:`` and otherwise runs
    its own transaction on ``engine``."""

    def __init__(self, url: str, engine: Engine | None = None, prepared_statements: bool = True) -> None:
        self.url = url
        self.engine = engine or create_db_engine(url)
        self.autocommit: Engine | None = None
        self.fast: FastPath | None = None
        if self.engine.dialect.name == "postgresql":
            self.autocommit = (self.engine.execution_options(isolation_level="AUTOCOMMIT") if engine is not None
                               else create_db_engine(url, autocommit=True))
            self.fast = FastPath(self.autocommit, prepared=prepared_statements)

    @property
    def transactional(self):
        """This store without the PostgreSQL fast path: every transition in the concerns' own transactions,
        on the same connection pools. Runs of sagas with gates, child steps, parallel groups or step flags
        (best-effort, non-atomic, pivot) use it: their transitions decide more than the fast statements do."""
        if self.fast is None:
            return self
        clone = self.__dict__.get("_transactional")
        if clone is None:
            clone = object.__new__(type(self))
            clone.__dict__.update(self.__dict__, fast=None)
            self._transactional = clone
        return clone

    def _read(self, read: Callable[[Connection], Any]) -> Any:
        """Run ``read(conn)``. On PostgreSQL the connection is an autocommit one, so a read is one round trip,
        not three (BEGIN, SELECT, ROLLBACK); each statement sees its own snapshot either way (READ
        COMMITTED). Reads change nothing, so one that meets a connection the server dropped (restart,
        pg_terminate_backend) is tried once more, on a fresh connection."""
        engine = self.autocommit or self.engine
        try:
            with engine.connect() as conn:
                return read(conn)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with engine.connect() as conn:
            return read(conn)

    def dispose(self, close: bool = True) -> None:
        """Drop pooled connections; ``close=False`` after a fork, so the parent's stay usable by it."""
        self.engine.dispose(close=close)
        if self.autocommit is not None:
            self.autocommit.dispose(close=close)

    def ping(self) -> None:
        """One ``SELECT 1`` on a pooled connection: raises whatever the database or the driver raises."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def schema_revision(self) -> str | None:
        """The database's Alembic revision; None when it has no sagaflow tables."""
        from sagaflow.store.migrate import current_revision  # alembic: loaded by the commands that need it

        return current_revision(self.engine)

    def check_schema(self) -> None:
        """Raise SchemaMissing, saying what to run, unless the database is at the latest migration."""
        from sagaflow.store.migrate import current_revision, head_revision

        where = self.engine.url.render_as_string(hide_password=True)
        if not inspect(self.engine).has_table(t.runs.name):
            raise SchemaMissing(f"the database {where} has no sagaflow tables: run `sagaflow db upgrade` first")
        current, head = current_revision(self.engine), head_revision()
        if current != head:
            raise SchemaMissing(
                f"the database {where} is at schema revision {current}, this sagaflow needs {head}: "
                f"run `sagaflow db upgrade`"
            )
