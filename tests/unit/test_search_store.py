"""Run search in the store (issue 16), on SQLite and PostgreSQL: each filter alone and combined, and the
typed comparison of input fields (a string also matches a number written the same way)."""

import datetime as dt

from sqlalchemy import update

from sagaflow.store import tables as t

UTC = dt.timezone.utc


def _make(store, run_id, input, created, key=None, saga="s"):
    store.create_run(run_id, saga, 1, input, [("a", True)], key)
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(created_at=created))


def _ids(store, **filters):
    runs, total = store.list_runs(**filters)
    assert total == len(runs)
    return sorted(r.id for r in runs)


def test_each_search_filter_alone_and_combined(store):
    day = dt.datetime(2026, 12, 1, tzinfo=UTC)
    _make(store, "r1", {"customer": "c1", "order": 17}, day, key="order-17")
    _make(store, "r2", {"customer": "c1", "order": 18, "vip": True}, day + dt.timedelta(days=1), key="order-18")
    _make(store, "r3", {"customer": "c2", "order": "17", "tags": ["a", "b"]}, day + dt.timedelta(days=2))
    _make(store, "r4", {"customer": "c2", "nested": {"x": 1}}, day + dt.timedelta(days=3), saga="other")

    assert _ids(store) == ["r1", "r2", "r3", "r4"]
    # since / until bound the start: since <= created_at < until
    assert _ids(store, since=day + dt.timedelta(days=1)) == ["r2", "r3", "r4"]
    assert _ids(store, until=day + dt.timedelta(days=1)) == ["r1"]
    assert _ids(store, since=day + dt.timedelta(days=1), until=day + dt.timedelta(days=3)) == ["r2", "r3"]
    # the idempotency key
    assert _ids(store, idempotency_key="order-18") == ["r2"]
    assert _ids(store, idempotency_key="order-99") == []
    # input fields: a string matches the string and the number written the same way
    assert _ids(store, input={"customer": "c1"}) == ["r1", "r2"]
    assert _ids(store, input={"order": "17"}) == ["r1", "r3"]
    assert _ids(store, input={"order": 17}) == ["r1"]
    assert _ids(store, input={"vip": "true"}) == ["r2"]
    assert _ids(store, input={"vip": True}) == ["r2"]
    assert _ids(store, input={"tags": ["a", "b"]}) == ["r3"]
    assert _ids(store, input={"nested": {"x": 1}}) == ["r4"]
    assert _ids(store, input={"customer": "c1", "order": "18"}) == ["r2"]
    assert _ids(store, input={"missing": "x"}) == []
    # combined with status, saga and time
    assert _ids(store, input={"customer": "c2"}, saga="s") == ["r3"]
    assert _ids(store, input={"customer": "c2"}, since=day + dt.timedelta(days=3)) == ["r4"]
    assert _ids(store, status="pending", input={"customer": "c1"}, idempotency_key="order-17") == ["r1"]
    assert _ids(store, status="succeeded", input={"customer": "c1"}) == []
    # pages: total counts every match, the page holds limit
    runs, total = store.list_runs(input={"customer": "c2"}, limit=1)
    assert (total, [r.id for r in runs]) == (2, ["r4"])
