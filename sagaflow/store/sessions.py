"""The SQL of the web app's security state (web/security.py, through SagaClient): operator sessions and
failed-authentication counts. In the database, not in a process, so every gunicorn worker (and every host) sees
the same logins, logouts and failures."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import case, delete, insert, literal, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from sagaflow.store import tables as t
from sagaflow.store.engine import Engines


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---------------------------------------------------------------------------------------------- sessions


def create_session(engine: Engine, session_id: str, lifetime: float) -> None:
    """Record a login; expired sessions are purged at the same time (they are refused anyway)."""
    now = _now()
    with engine.begin() as conn:
        conn.execute(delete(t.operator_sessions).where(t.operator_sessions.c.expires_at < now))
        conn.execute(insert(t.operator_sessions).values(
            id=session_id, created_at=now, expires_at=now + dt.timedelta(seconds=lifetime)))


def session_alive(engine: Engine, session_id: str) -> bool:
    with engine.connect() as conn:
        expires = conn.execute(select(t.operator_sessions.c.expires_at)
                               .where(t.operator_sessions.c.id == session_id)).scalar()
    return expires is not None and expires > _now()


def revoke_session(engine: Engine, session_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(t.operator_sessions).where(t.operator_sessions.c.id == session_id))


# ---------------------------------------------------------------------------------------------- failures


def retry_after(engine: Engine, client: str, limit: int, window: float) -> int:
    """Seconds until ``client`` may try again: 0 unless it failed ``limit`` times in the current window."""
    now = _now()
    with engine.connect() as conn:
        row = conn.execute(select(t.auth_failures.c.failures, t.auth_failures.c.window_start)
                           .where(t.auth_failures.c.client == client)).first()
    if row is None or row.failures < limit:
        return 0
    left = (row.window_start + dt.timedelta(seconds=window) - now).total_seconds()
    return max(int(left) + 1, 0) if left > 0 else 0


def record_failure(engine: Engine, client: str, window: float) -> int:
    """Count a failure of ``client``; returns its failures in the current window. A window starts at the
    first failure after the previous one ended. One atomic UPDATE (or the first INSERT), so concurrent
    processes never lose a count."""
    now = _now()
    cutoff = now - dt.timedelta(seconds=window)
    c = t.auth_failures.c
    expired = c.window_start <= cutoff
    stmt = (update(t.auth_failures).where(c.client == client)
            .values(failures=case((expired, 1), else_=c.failures + 1),
                    window_start=case((expired, literal(now, t.UTCDateTime())), else_=c.window_start),
                    last_at=now))
    for _ in range(3):
        with engine.begin() as conn:
            if conn.execute(stmt).rowcount:
                return conn.execute(select(c.failures).where(c.client == client)).scalar_one()
        try:
            with engine.begin() as conn:
                # Rows of clients that stopped failing long ago go when another client fails.
                conn.execute(delete(t.auth_failures).where(c.last_at < cutoff))
                conn.execute(insert(t.auth_failures).values(client=client, failures=1, window_start=now,
                                                            last_at=now))
            return 1
        except IntegrityError:
            continue  # another process inserted it first: update its row
    raise RuntimeError(f"could not record an authentication failure of {client}")  # pragma: no cover


def clear_failures(engine: Engine, client: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(t.auth_failures).where(t.auth_failures.c.client == client))


class Sessions(Engines):
    """The Store's part for these (the web reaches them through SagaClient, never the engine)."""

    def create_session(self, session_id: str, lifetime: float) -> None:
        create_session(self.engine, session_id, lifetime)

    def session_alive(self, session_id: str) -> bool:
        return session_alive(self.engine, session_id)

    def revoke_session(self, session_id: str) -> None:
        revoke_session(self.engine, session_id)

    def auth_retry_after(self, client: str, limit: int, window: float) -> int:
        return retry_after(self.engine, client, limit, window)

    def record_auth_failure(self, client: str, window: float) -> int:
        return record_failure(self.engine, client, window)

    def clear_auth_failures(self, client: str) -> None:
        clear_failures(self.engine, client)
