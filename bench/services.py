"""The services: the project folder, the Redis and PostgreSQL the bench checks before it starts, and the
database of its own that it creates and drops."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check_services(redis_url: str, pg_admin_url: str) -> None:
    import psycopg2
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_timeout=3, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise SystemExit(f"bench: Redis at {redis_url} does not answer ({exc}); start it or pass --redis-url") from exc
    try:
        psycopg2.connect(dsn(pg_admin_url), connect_timeout=5).close()
    except psycopg2.Error as exc:
        raise SystemExit(f"bench: PostgreSQL at {pg_admin_url} does not answer ({str(exc).strip()}); "
                         f"start it or pass --pg-admin-url") from exc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin(pg_admin_url: str, statements: list[str]) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn(pg_admin_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def fresh_database(pg_admin_url: str, name: str) -> str:
    """Drop and create the benchmark's own database; returns its URL."""
    from sqlalchemy.engine import make_url

    _admin(pg_admin_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'])
    return make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(pg_admin_url: str, name: str) -> None:
    _admin(pg_admin_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'])
