"""The operator's store calls (issue 16) on SQLite and PostgreSQL: resolve by hand, restart links, deadlines."""

import datetime as dt

import pytest
from sqlalchemy import func, select, update

from sagaflow.errors import InvalidTransition, UnknownRun
from sagaflow.store import tables as t


def _set(store, run_id, **values):
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))


def _events(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(t.events)).scalar_one()


@pytest.mark.parametrize("status", ["compensation_failed", "stuck"])
def test_resolve_settles_a_run_waiting_for_an_operator(store, status):
    store.create_run("r1", "s", 1, {}, [("a", True)])
    _set(store, "r1", status=status)
    run = store.resolve_run("r1", "done by hand")
    assert run.status == "resolved" and run.finished_at is not None
    assert (run.events[-1].kind, run.events[-1].detail) == ("run_resolved", {"note": "done by hand", "from": status})


@pytest.mark.parametrize("status", ["pending", "running", "compensating", "succeeded", "compensated", "cancelled",
                                    "failed", "waiting", "resolved"])
def test_resolve_refuses_every_other_status_and_writes_nothing(store, status):
    store.create_run("r1", "s", 1, {}, [("a", True)])
    _set(store, "r1", status=status)
    before = _events(store)
    with pytest.raises(InvalidTransition, match=f"run r1 is {status}"):
        store.resolve_run("r1", "no")
    assert store.get_run("r1").status == status and _events(store) == before
    with pytest.raises(UnknownRun):
        store.resolve_run("nope", "no")


def test_restart_links_both_ways(store):
    store.create_run("old", "s", 1, {}, [("a", True)])
    store.create_run("new", "s", 2, {}, [("a", True)])
    store.link_restart("old", "new", 2, "version 1 is gone")
    old, new = store.get_run("old"), store.get_run("new")
    assert new.restarted_from == "old" and old.restarted_from is None
    assert (old.events[-1].kind, old.events[-1].detail) == ("run_restarted", {"new_run_id": "new", "saga_version": 2})
    assert new.events[-1].kind == "restarted_from"
    assert new.events[-1].detail == {"run_id": "old", "saga_version": 2, "note": "version 1 is gone"}


def test_a_passed_deadline_is_taken_once_and_only_for_a_live_run(store):
    now = dt.datetime.now(dt.timezone.utc)
    for run_id in ("live", "later", "ended", "none"):
        store.create_run(run_id, "s", 1, {}, [("a", True)])
    store.set_deadline("live", now - dt.timedelta(seconds=1))
    store.set_deadline("later", now + dt.timedelta(hours=1))
    store.set_deadline("ended", now - dt.timedelta(seconds=1))
    _set(store, "ended", status="succeeded")

    passed = store.passed_deadlines()
    assert [run_id for run_id, _ in passed] == ["live"]
    assert store.get_run("ended").deadline_at is None  # cleared: the next sweeps do not scan it again
    assert store.take_deadline("live", passed[0][1]) is True
    assert store.take_deadline("live", passed[0][1]) is False  # another sweeper: already taken
    assert store.get_run("live").events[-1].kind == "deadline_passed"
    assert store.passed_deadlines() == []
    assert store.get_run("later").deadline_at is not None
