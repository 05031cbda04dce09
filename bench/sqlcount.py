"""Count the SQL round trips and statements of a worker process, without touching the runtime.

Imported by the sagaflow worker (through SAGAFLOW_IMPORTS) only in the benchmark's counting phase. It
listens on SQLAlchemy's Engine and Pool classes, so it sees every engine the process creates:

  statement   before_cursor_execute                   one round trip each
  begin       psycopg2 sends BEGIN as its own query, before the first statement of a transaction
  commit      COMMIT
  rollback    ROLLBACK (a read-only `engine.connect()` block ends with one)
              (none of the three on an autocommit connection, where psycopg2 sends nothing)
  ping        pool_pre_ping sends SELECT 1 on each checkout of a pooled connection, except the first
              checkout of a new one, on the pools that have it (sagaflow's transactional engine, not
              its hot-path autocommit engine); it runs below the Engine events

Counts are kept per process and, after each task (task_postrun), added to a hash in the benchmark's Redis
db (BENCH_REDIS_URL), as "<kind>" and "<task name>|<kind>" fields. The harness resets the hash after a
warm-up and reads it after the measured runs.
"""

from __future__ import annotations

import os
from collections import Counter

import redis
from celery.signals import task_postrun, task_prerun
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from sagaflow.store import fastpath

KEY = "bench:sql"

_counts: Counter = Counter()
_task = {"name": "outside_tasks"}
_redis: redis.Redis | None = None


def _add(kind: str, n: int = 1) -> None:
    _counts[kind] += n
    _counts[f"{_task['name']}|{kind}"] += n


@event.listens_for(Engine, "before_cursor_execute")
def _statement(conn, cursor, statement, parameters, context, executemany):
    _add("statement")


# The fast path's prepared statements go to the driver directly, past SQLAlchemy's execution events.
fastpath.STATEMENT_HOOKS.append(lambda engine: _add("statement"))


def _autocommit(conn) -> bool:
    """An autocommit connection sends no BEGIN, COMMIT or ROLLBACK: psycopg2 skips them."""
    return bool(getattr(conn.connection.driver_connection, "autocommit", False))


@event.listens_for(Engine, "begin")
def _begin(conn):
    if not _autocommit(conn):
        _add("begin")


@event.listens_for(Engine, "commit")
def _commit(conn):
    if not _autocommit(conn):
        _add("commit")


@event.listens_for(Engine, "rollback")
def _rollback(conn):
    if not _autocommit(conn):
        _add("rollback")


@event.listens_for(Pool, "checkout")
def _checkout(dbapi_connection, record, proxy):
    _add("checkout")
    # pool_pre_ping pings an existing connection at checkout, not a new one (and only on pools that have
    # it: sagaflow's hot-path engine has not).
    if proxy._pool._pre_ping and not record.info.pop("bench_fresh", False):
        _add("ping")


@event.listens_for(Pool, "connect")
def _connect(dbapi_connection, record):
    record.info["bench_fresh"] = True
    _add("connect")


@task_prerun.connect
def _started(sender=None, **_):
    _task["name"] = getattr(sender, "name", "unknown")


@task_postrun.connect
def _flush(**_):
    global _redis
    _task["name"] = "outside_tasks"
    if not _counts:
        return
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    pipe = _redis.pipeline(transaction=False)
    for field, n in _counts.items():
        pipe.hincrby(KEY, field, n)
    pipe.execute()
    _counts.clear()
