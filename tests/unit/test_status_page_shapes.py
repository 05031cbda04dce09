"""The status page shows what the issue-5 features add to a run: gates waiting for a signal (with the
operator's form), child and parent links, parallel groups, step flags, a passed pivot, plain-mode runs.
Rendered by the Flask app on SQLite: the behaviour itself is tested on a real worker elsewhere."""

import datetime as dt

from sqlalchemy import update

from sagaflow.model import StepSpec
from sagaflow.store import tables as t


def _set_step(store, run_id, idx, **values):
    with store.engine.begin() as conn:
        conn.execute(update(t.steps).where(t.steps.c.run_id == run_id, t.steps.c.idx == idx).values(**values))


def test_a_waiting_gate_child_links_groups_and_flags_are_shown(app_and_store):
    app, store = app_and_store
    now = dt.datetime.now(dt.timezone.utc)
    store.create_run("parent-1", "shapes", 1, {}, [
        StepSpec("reserve", True, non_atomic=True),
        StepSpec("left", True, group=1), StepSpec("right", False, group=1, best_effort=True),
        StepSpec("charge", False, pivot=True),
        StepSpec("approve", False, kind="gate", signal="approved"),
        StepSpec("sub", True, kind="child"),
    ])
    store.create_run("child-1", "sub_saga", 1, {}, [StepSpec("x", True)], parent_run_id="parent-1", parent_step=5)
    for idx in range(4):
        _set_step(store, "parent-1", idx, status="succeeded", started_at=now, finished_at=now)
    _set_step(store, "parent-1", 4, status="waiting", started_at=now, deadline_at=now + dt.timedelta(hours=1))
    _set_step(store, "parent-1", 5, child_run_id="child-1")
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == "parent-1").values(status="waiting"))

    page = app.test_client().get("/runs/parent-1").get_data(as_text=True)
    assert 'id="waiting-approve"' in page and "for signal <code>approved</code>" in page
    assert 'id="signal-button"' in page and "/runs/parent-1/signals/approved" in page
    assert "parallel group 1" in page and "best-effort" in page and "non-atomic" in page
    assert 'id="past-pivot"' in page and "<b>charge</b>" in page
    assert 'id="cancel-button"' not in page  # past the pivot: it can no longer be undone
    assert 'href="/runs/child-1"' in page
    child = app.test_client().get("/runs/child-1").get_data(as_text=True)
    assert 'id="parent-link"' in child and 'href="/runs/parent-1"' in child
    listing = app.test_client().get("/").get_data(as_text=True)
    assert "child of" in listing and "status-waiting" in listing


def test_a_plain_mode_run_says_so(app_and_store):
    app, store = app_and_store
    store.create_run("plain-1", "booking", 1, {}, [StepSpec("a", True)], mode="plain")
    assert store.get_run("plain-1").steps == ()
    page = app.test_client().get("/runs/plain-1").get_data(as_text=True)
    assert 'id="run-mode"' in page and "switched off by policy" in page


def test_child_branches_of_a_parallel_group_each_link_to_their_child_run(app_and_store):
    app, store = app_and_store
    now = dt.datetime.now(dt.timezone.utc)
    kids = ("kid_a", "kid_b", "kid_c")
    store.create_run("parent-k", "kids", 1, {}, [StepSpec("open", True)] + [
        StepSpec(name, True, kind="child", group=1) for name in kids] + [StepSpec("total", True)])
    for idx, name in enumerate(kids, 1):
        store.create_run(f"child-{name}", "child_booking", 1, {}, [StepSpec("x", True)],
                         parent_run_id="parent-k", parent_step=idx)
    _set_step(store, "parent-k", 0, status="succeeded", started_at=now, finished_at=now)
    _set_step(store, "parent-k", 1, status="succeeded", started_at=now, finished_at=now, child_run_id="child-kid_a")
    for idx in (2, 3):  # still waiting for their children, while the run runs its group
        _set_step(store, "parent-k", idx, status="waiting", started_at=now, child_run_id=f"child-{kids[idx - 1]}")
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == "parent-k").values(status="running"))

    page = app.test_client().get("/runs/parent-k").get_data(as_text=True)
    for name in kids:
        assert f'href="/runs/child-{name}"' in page
    assert 'id="waiting-kid_b"' in page and 'id="waiting-kid_c"' in page and 'id="waiting-kid_a"' not in page
    assert page.count("Waiting for child run") == 2 and page.count("parallel group 1") == 3
    child = app.test_client().get("/runs/child-kid_b").get_data(as_text=True)
    assert 'id="parent-link"' in child and 'href="/runs/parent-k"' in child
