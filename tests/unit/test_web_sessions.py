"""The web app's security state in SQL (sagaflow/store/sessions.py), on SQLite and PostgreSQL: operator
sessions that logout revokes and that expire, failure counts per client address in a window, and
migration 0003 both ways."""

import datetime as dt

import pytest
from sqlalchemy import delete, inspect, update

from sagaflow.store import sessions
from sagaflow.store import tables as t
from sagaflow.store.migrate import downgrade, upgrade

WEB_TABLES = {"saga_operator_sessions", "saga_auth_failures"}


@pytest.fixture
def engine(store):
    with store.engine.begin() as conn:
        conn.execute(delete(t.operator_sessions))
        conn.execute(delete(t.auth_failures))
    return store.engine


def test_a_session_lives_until_it_is_revoked(engine):
    sessions.create_session(engine, "s1", 3600)
    sessions.create_session(engine, "s2", 3600)
    assert sessions.session_alive(engine, "s1") and sessions.session_alive(engine, "s2")
    assert not sessions.session_alive(engine, "nope")

    sessions.revoke_session(engine, "s1")
    assert not sessions.session_alive(engine, "s1")
    assert sessions.session_alive(engine, "s2")  # another browser's login is untouched


def test_an_expired_session_is_refused_and_purged_at_the_next_login(engine):
    sessions.create_session(engine, "old", 3600)
    with engine.begin() as conn:
        conn.execute(update(t.operator_sessions).values(
            expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    assert not sessions.session_alive(engine, "old")
    sessions.create_session(engine, "new", 3600)
    with engine.connect() as conn:
        assert [r.id for r in conn.execute(t.operator_sessions.select())] == ["new"]


def test_failures_are_counted_per_client_and_throttle_past_the_limit_until_the_window_ends(engine):
    for n in range(1, 4):
        assert sessions.record_failure(engine, "10.0.0.1", 300) == n
    assert sessions.record_failure(engine, "10.0.0.2", 300) == 1
    assert sessions.retry_after(engine, "10.0.0.1", 3, 300) in range(299, 302)
    assert sessions.retry_after(engine, "10.0.0.1", 4, 300) == 0  # under that limit
    assert sessions.retry_after(engine, "10.0.0.2", 3, 300) == 0
    assert sessions.retry_after(engine, "10.0.0.3", 3, 300) == 0  # never failed

    # The window ended: the client may try again, and its next failure starts a new window at 1.
    with engine.begin() as conn:
        conn.execute(update(t.auth_failures).where(t.auth_failures.c.client == "10.0.0.1").values(
            window_start=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=301)))
    assert sessions.retry_after(engine, "10.0.0.1", 3, 300) == 0
    assert sessions.record_failure(engine, "10.0.0.1", 300) == 1

    sessions.clear_failures(engine, "10.0.0.2")
    assert sessions.record_failure(engine, "10.0.0.2", 300) == 1


def test_migration_0003_downgrades_and_upgrades_again(store):
    url = store.engine.url.render_as_string(hide_password=False)
    store.dispose()
    downgrade(url, "0002")
    assert not WEB_TABLES & set(inspect(store.engine).get_table_names())
    store.dispose()
    upgrade(url)
    assert WEB_TABLES <= set(inspect(store.engine).get_table_names())
