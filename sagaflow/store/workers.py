"""Worker liveness and the one sweeper: heartbeats, which workers are alive, and leases.

Every worker main process keeps a row in ``saga_workers`` and moves its ``heartbeat_at`` every few seconds
(runtime/liveness.py); a clean stop deletes the row. A claim (claims.py, compensation.py, fastpath.py)
names the worker whose pool holds it, written by the claim's own UPDATE: no statement more on the hot path.
A worker is *alive* while its row's heartbeat is younger than ``dead_after`` seconds; a claim naming a
worker that is not alive is taken back by the sweeper at once, whatever its lease (recovery.py).

The process's own worker id is a process global (``current_worker``): set in the worker's main process
before the pool forks, so every pool child inherits it; None elsewhere (the web app, the CLI, a client),
whose claims fall back to the lease alone.

Leases (``saga_leases``): a named row that one process holds until ``expires_at``. The sweeper's lease
makes one worker at a time sweep across the whole deployment, on PostgreSQL and SQLite alike: each
worker offers every interval (one UPDATE), the holder renews it and sweeps, the others skip.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, delete, exists, false, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import HELD_STEP

_current_worker: str | None = None


def set_current_worker(worker_id: str | None) -> None:
    global _current_worker
    _current_worker = worker_id


def current_worker() -> str | None:
    """The id of the worker this process belongs to (its main process or a pool child), else None."""
    return _current_worker


def claim_alive(now: dt.datetime, dead_after: float | None):
    """A held step's claim still counts: its lease runs and, when it names a worker, that worker has
    heartbeated within ``dead_after`` seconds (None: the lease alone decides)."""
    s, w = t.steps.c, t.workers.c
    lease = s.lease_expires_at >= now
    if dead_after is None:
        return lease
    beat_since = now - dt.timedelta(seconds=dead_after)
    return and_(lease, or_(s.worker.is_(None),
                           exists().where(w.id == s.worker, w.heartbeat_at >= beat_since)))


def worker_dead(now: dt.datetime, dead_after: float | None):
    """A held step's claim names a worker that has not heartbeated within ``dead_after`` seconds (never, with
    None: then only leases decide)."""
    s, w = t.steps.c, t.workers.c
    if dead_after is None:
        return false()
    beat_since = now - dt.timedelta(seconds=dead_after)
    return and_(s.worker.is_not(None), ~exists().where(w.id == s.worker, w.heartbeat_at >= beat_since))


class Workers(Engines):
    def heartbeat(self, worker_id: str, hostname: str, pid: int, queues: str = "") -> None:
        """Record that ``worker_id`` is alive (insert its row the first time)."""
        now = utcnow()
        w = t.workers.c
        # One UPDATE, one round trip on PostgreSQL (autocommit: no BEGIN, COMMIT or pre-ping); only a
        # worker's first beat inserts its row (a worker has one id, so no two processes race for it).
        with (self.autocommit.connect() if self.autocommit is not None else self.engine.begin()) as conn:
            moved = conn.execute(update(t.workers).where(w.id == worker_id).values(heartbeat_at=now)).rowcount
            if not moved:
                conn.execute(insert(t.workers).values(id=worker_id, hostname=hostname, pid=pid,
                                                      queues=queues or None, started_at=now, heartbeat_at=now))

    def remove_worker(self, worker_id: str) -> bool:
        """A clean stop: the worker leaves the list (its claims, if any, count as a dead worker's)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(delete(t.workers).where(t.workers.c.id == worker_id)).rowcount)

    def forget_dead_workers(self, older_than: float) -> int:
        """Delete the rows of workers silent for ``older_than`` seconds (the sweeper, after their claims
        were taken back)."""
        since = utcnow() - dt.timedelta(seconds=older_than)
        w, s = t.workers.c, t.steps.c
        with self.engine.begin() as conn:
            return conn.execute(delete(t.workers).where(
                w.heartbeat_at < since,
                ~exists().where(s.worker == w.id, s.status.in_(HELD_STEP)))).rowcount

    def live_workers(self, dead_after: float) -> list[dict]:
        """The workers heartbeating within ``dead_after`` seconds, each with the steps its pool holds
        (run id, step, status), oldest first: the status page's "live workers"."""
        now = utcnow()
        since = now - dt.timedelta(seconds=dead_after)
        w, s = t.workers.c, t.steps.c

        def read(conn):
            workers = conn.execute(select(t.workers).where(w.heartbeat_at >= since).order_by(w.started_at)).all()
            held = conn.execute(
                select(s.worker, s.run_id, s.name, s.status)
                .where(s.worker.in_([row.id for row in workers]), s.status.in_(HELD_STEP))
                .order_by(s.run_id, s.idx)
            ).all() if workers else []
            return workers, held

        workers, held = self._read(read)
        return [{"id": row.id, "hostname": row.hostname, "pid": row.pid, "queues": row.queues or "",
                 "started_at": row.started_at, "heartbeat_at": row.heartbeat_at,
                 "age": round((now - row.heartbeat_at).total_seconds(), 1),
                 "holds": [{"run_id": h.run_id, "step": h.name, "status": h.status}
                           for h in held if h.worker == row.id]}
                for row in workers]

    def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Hold lease ``name`` for ``seconds`` if it is free, expired, or already ours (a renewal). True
        when ``holder`` holds it now: of many callers at once, one wins."""
        now = utcnow()
        until = now + dt.timedelta(seconds=seconds)
        c = t.leases.c
        with (self.autocommit.connect() if self.autocommit is not None else self.engine.begin()) as conn:
            won = conn.execute(update(t.leases).where(
                c.name == name, or_(c.holder == holder, c.expires_at < now)
            ).values(holder=holder, expires_at=until)).rowcount
            if won:
                return True
            if conn.execute(select(c.name).where(c.name == name)).first() is not None:
                return False
        try:  # the first offer ever: one INSERT wins, the others hit the primary key
            with self.engine.begin() as conn:
                conn.execute(insert(t.leases).values(name=name, holder=holder, expires_at=until))
            return True
        except IntegrityError:
            return False

    def release_lease(self, name: str, holder: str) -> None:
        c = t.leases.c
        with self.engine.begin() as conn:
            conn.execute(delete(t.leases).where(c.name == name, c.holder == holder))
