"""Retention in the store (issue 16), on SQLite and PostgreSQL: exactly the old ended runs go, with their
steps, events and signals; every counter keeps what they counted (the live gauge loses them)."""

import datetime as dt

from sqlalchemy import delete, func, select, update

from sagaflow.store import stats
from sagaflow.store import tables as t

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC)
OLD = NOW - dt.timedelta(days=40)


def _run(store, run_id, status, ended=OLD, parent=None):
    store.create_run(run_id, "s", 1, {}, [("a", True)])
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(
            status=status, created_at=ended - dt.timedelta(seconds=2), updated_at=ended,
            finished_at=ended if status not in ("pending", "running", "compensating", "waiting") else None,
            parent_run_id=parent))
        conn.execute(update(t.steps).where(t.steps.c.run_id == run_id).values(
            status="succeeded", started_at=ended - dt.timedelta(seconds=1), finished_at=ended))
        if status == "succeeded":
            conn.execute(t.events.insert().values(run_id=run_id, kind="step_succeeded", step="a", at=ended))
            conn.execute(t.events.insert().values(run_id=run_id, kind="run_succeeded", at=ended))


def _count(store, table) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def _ids(store) -> set:
    with store.engine.connect() as conn:
        return set(conn.execute(select(t.runs.c.id)).scalars())


def test_prune_deletes_exactly_the_old_ended_runs_and_keeps_their_counts(store):
    for status in ("succeeded", "compensated", "cancelled", "failed", "resolved"):
        _run(store, f"old-{status}", status)
    for status in ("pending", "running", "compensating", "waiting", "stuck", "compensation_failed"):
        _run(store, f"old-{status}", status)
    _run(store, "new-succeeded", "succeeded", ended=dt.datetime.now(UTC))
    _run(store, "parent", "succeeded")  # its child is still running: kept
    _run(store, "child", "running", parent="parent")
    _run(store, "child-of-live", "succeeded", parent="old-running")  # its parent is live: kept
    with store.engine.begin() as conn:  # the rows were moved past the runtime above: count them afresh
        conn.execute(delete(t.counter_log))
    store.seed_counters()
    before = store.counter_values()
    keep = _ids(store) - {f"old-{s}" for s in ("succeeded", "compensated", "cancelled", "failed", "resolved")}

    dry = store.prune(NOW - dt.timedelta(days=30), dry_run=True)
    assert (dry.runs, dry.by_status) == (5, {s: 1 for s in ("succeeded", "compensated", "cancelled", "failed",
                                                              "resolved")})
    assert len(_ids(store)) == len(keep) + 5  # the dry run deleted nothing

    done = store.prune(NOW - dt.timedelta(days=30), batch=2)  # several batches
    assert done.runs == 5 and _ids(store) == keep
    for table in (t.steps, t.events, t.signals):
        with store.engine.connect() as conn:
            assert not conn.execute(select(table.c.run_id).where(table.c.run_id.like("old-%")).where(
                table.c.run_id.notin_([k for k in keep]))).first()
    after = store.counter_values()
    assert (after.started, after.finished, after.steps, after.histograms) == (
        before.started, before.finished, before.steps, before.histograms)
    assert after.started == {"s": 15} and after.finished[("s", "succeeded")] == 4
    assert {k: v for k, v in after.live.items() if v} == store.run_counts() == stats.run_counts(store.engine)
    assert store.prune(NOW - dt.timedelta(days=30)).runs == 0  # nothing left to prune
    assert store.counter_values() == after


def test_the_sweeper_prunes_only_with_sagaflow_retention(store, monkeypatch):
    from sagaflow.config.settings import Settings
    from sagaflow.runtime import recovery

    _run(store, "old", "succeeded")
    _run(store, "young", "succeeded", ended=NOW - dt.timedelta(hours=1))
    off = Settings.from_env({"SAGAFLOW_DATABASE_URL": "sqlite://"})
    assert off.retention == 0
    monkeypatch.setattr(recovery, "get_settings", lambda: off)
    assert recovery.prune_by_retention(store) == 0 and _ids(store) == {"old", "young"}
    on = Settings.from_env({"SAGAFLOW_DATABASE_URL": "sqlite://", "SAGAFLOW_RETENTION": "30d"})
    assert on.retention == 30 * 86400 and Settings.from_env(on.as_env()).retention == on.retention
    monkeypatch.setattr(recovery, "get_settings", lambda: on)
    assert recovery.prune_by_retention(store) == 1 and _ids(store) == {"young"}


def test_a_bad_sagaflow_retention_is_refused():
    import pytest

    from sagaflow.config.settings import Settings

    for bad in ("30", "30 days", "0d", "-1d", "1w"):
        with pytest.raises(ValueError, match="SAGAFLOW_RETENTION must be a duration"):
            Settings.from_env({"SAGAFLOW_RETENTION": bad})
