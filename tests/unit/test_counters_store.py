"""The metrics' counters kept by the transitions themselves (store/counters.py), on SQLite and PostgreSQL (the
fast path's statements there): after runs of every kind the live gauge equals the rows' statuses, the counters
equal what the event history counts, compaction and prune change no counter, histogram sums only grow."""

import datetime as dt

from sqlalchemy import select

from sagaflow.store import counters, stats
from sagaflow.store import tables as t

STEPS = [("a", True), ("b", True)]


def _counts(store):
    return store.counter_values()


def _check_against_rows(store, plain_ends=()):
    """The counters say what counting the rows says (a plain run records no end event: ``plain_ends``)."""
    read = _counts(store)
    assert {k: v for k, v in read.live.items() if v} == stats.run_counts(store.engine)
    assert store.run_counts() == stats.run_counts(store.engine)
    ends = dict(stats.run_end_counts(store.engine))
    for status in plain_ends:
        ends[("s", status)] = ends.get(("s", status), 0) + 1
    assert read.finished == ends
    assert read.steps == stats.step_event_counts(store.engine)
    return read


def _succeeded(store, run_id):
    store.create_run(run_id, "s", 1, {}, STEPS)
    store.claim_step(run_id, 0, f"{run_id}-a:0", [], 60)
    assert store.complete_step(run_id, 0, f"{run_id}-a:0", 1)
    store.claim_step(run_id, 1, f"{run_id}-b:0", [], 60)
    assert store.complete_last_step(run_id, 1, f"{run_id}-b:0", 2) == "succeeded"


def _compensated(store, run_id, undo_fails=False):
    store.create_run(run_id, "s", 1, {}, STEPS)
    store.claim_step(run_id, 0, f"{run_id}-a:0", [], 60)
    assert store.complete_step(run_id, 0, f"{run_id}-a:0", 1)
    store.claim_step(run_id, 1, f"{run_id}-b:0", [], 60)
    assert store.retry_step(run_id, 1, f"{run_id}-b:0", "flaky", 0.0, 60)
    store.claim_step(run_id, 1, f"{run_id}-b:1", [f"{run_id}-b:0"], 60)
    assert store.fail_step(run_id, 1, f"{run_id}-b:1", "boom")
    assert store.begin_compensation(run_id, 1, "lost") == [0]
    store.claim_compensation(run_id, 0, f"{run_id}-u:0", [], 60)
    if undo_fails:
        assert store.fail_compensation(run_id, 0, f"{run_id}-u:0", "undo boom")
        assert store.mark_compensation_failed(run_id, 0, "gave up")
    else:
        assert store.complete_compensation(run_id, 0, f"{run_id}-u:0") == "compensated"


def test_live_gauges_and_counters_follow_runs_of_every_kind(store):
    _succeeded(store, "ok")
    read = _check_against_rows(store)
    assert read.started == {"s": 1} and read.live[("s", "succeeded")] == 1
    _compensated(store, "undone")
    _compensated(store, "stuck-undo", undo_fails=True)
    assert store.get_run("stuck-undo").status == "compensation_failed"
    _check_against_rows(store)
    # the operator: retry the failed undo, which then compensates; resolve another
    _compensated(store, "again", undo_fails=True)
    assert store.request_retry("again") == [0]
    store.claim_compensation("again", 0, "again-u:1", [], 60)
    assert store.complete_compensation("again", 0, "again-u:1") == "compensated"
    store.resolve_run("stuck-undo", "fixed by hand")
    # cancelled before its first step; a restart is a new run
    store.create_run("cancel", "s", 1, {}, STEPS)
    store.request_cancel("cancel")
    assert store.begin_compensation("cancel", 0, "cancelled") == []
    assert store.get_run("cancel").status == "cancelled"
    store.create_run("restart", "s", 1, {}, STEPS)
    store.link_restart("undone", "restart", 1)
    store.create_run("plain", "s", 1, {}, [], mode="plain")
    assert store.finish_plain_run("plain")
    store.create_run("plain-failed", "s", 1, {}, [], mode="plain")
    assert store.fail_plain_run("plain-failed", "boom")
    read = _check_against_rows(store, plain_ends=("succeeded", "failed"))
    # plain runs record no end event: their ends are in the live gauge and the counters (not in events)
    assert read.started == {"s": 8}
    assert read.live == {("s", "succeeded"): 2, ("s", "compensated"): 2, ("s", "compensation_failed"): 0,
                         ("s", "resolved"): 1, ("s", "cancelled"): 1, ("s", "pending"): 1, ("s", "running"): 0,
                         ("s", "compensating"): 0, ("s", "failed"): 1} | {
        k: v for k, v in read.live.items() if k[1] not in ("succeeded", "compensated", "compensation_failed",
                                                           "resolved", "cancelled", "pending", "running",
                                                           "compensating", "failed")}
    assert read.finished[("s", "compensation_failed")] == 2 and read.finished[("s", "compensated")] == 2
    steps = read.histograms["step_duration"]
    assert steps[("s", "a", "succeeded")].count == 4 and steps[("s", "b", "failed")].count == 3
    undos = read.histograms["compensation_duration"]
    assert undos[("s", "a", "succeeded")].count == 2 and undos[("s", "a", "failed")].count == 2
    runs = read.histograms["run_duration"]
    assert runs[("s", "", "succeeded")].count == 2 and runs[("s", "", "resolved")].count == 1
    for series in read.histograms.values():
        for h in series.values():
            assert h.cumulative == sorted(h.cumulative) and h.cumulative[-1] <= h.count
            assert h.sum_us >= 0 and h.sum == h.sum_us / 1_000_000


def test_a_failure_that_begins_its_compensation_in_the_same_transition_counts_as_the_two_did(store):
    """store.fail_and_compensate (a linear saga's step failing in its own task) moves the same counters as
    fail_step followed by the errback's begin_compensation."""
    store.create_run("undone", "s", 1, {}, STEPS)
    store.claim_step("undone", 0, "undone-a:0", [], 60)
    assert store.complete_step("undone", 0, "undone-a:0", 1)
    store.claim_step("undone", 1, "undone-b:0", [], 60)
    assert store.fail_and_compensate("undone", 1, "undone-b:0", "boom") == (True, [0])
    _check_against_rows(store)
    store.claim_compensation("undone", 0, "undone-u:0", [], 60)
    assert store.complete_compensation("undone", 0, "undone-u:0") == "compensated"
    store.create_run("first", "s", 1, {}, STEPS)
    store.claim_step("first", 0, "first-a:0", [], 60)
    assert store.fail_and_compensate("first", 0, "first-a:0", "boom") == (True, [])
    read = _check_against_rows(store)
    assert read.finished == {("s", "compensated"): 2} and read.live[("s", "running")] == 0
    steps = read.histograms["step_duration"]
    assert steps[("s", "b", "failed")].count == 1 and steps[("s", "a", "failed")].count == 1


def test_compaction_and_prune_change_no_counter_and_sums_only_grow(store):
    for i in range(3):
        _succeeded(store, f"ok-{i}")
    _compensated(store, "undone")
    store.create_run("live", "s", 1, {}, STEPS)
    before = _counts(store)
    assert store.compact_counters() > 0
    with store.engine.connect() as conn:
        assert conn.execute(select(t.counter_log.c.id)).first() is None
    assert _counts(store) == before
    sums = {k: h.sum_us for k, h in before.histograms["step_duration"].items()}

    # every run ended long ago: the prune takes the four ended ones and leaves the live one
    with store.engine.begin() as conn:
        conn.execute(t.runs.update().where(t.runs.c.id != "live").values(
            finished_at=dt.datetime(2020, 1, 1), updated_at=dt.datetime(2020, 1, 1)))
    assert store.prune(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).runs == 4
    after = _counts(store)
    assert (after.started, after.finished, after.steps) == (before.started, before.finished, before.steps)
    assert after.histograms == before.histograms
    assert {k: v for k, v in after.live.items() if v} == {("s", "pending"): 1} == stats.run_counts(store.engine)
    _succeeded(store, "later")
    later = _counts(store)
    assert later.started["s"] == before.started["s"] + 1
    for key, total in sums.items():
        assert later.histograms["step_duration"][key].sum_us >= total
    assert store.compact_counters() > 0 and _counts(store) == later


def test_seed_counts_rows_written_past_the_runtime(store):
    _succeeded(store, "ok")
    by_runtime = _counts(store)
    with store.engine.begin() as conn:
        conn.execute(t.counter_log.delete())
        conn.execute(t.counters.delete())
    store.seed_counters()
    seeded = _counts(store)
    assert (seeded.started, seeded.live, seeded.finished, seeded.steps) == (
        by_runtime.started, {k: v for k, v in by_runtime.live.items() if v}, by_runtime.finished, by_runtime.steps)
    assert {k: h.count for k, h in seeded.histograms["step_duration"].items()} == {
        k: h.count for k, h in by_runtime.histograms["step_duration"].items()}


def test_the_live_gauge_follows_delayed_starts_and_sleeps(store):
    """A delayed start is live as scheduled, not pending; its release and its cancel move the gauge; a step
    waiting on a timer holds its run in waiting (the time features of store/timers.py)."""
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    store.create_run("later", "s", 1, {}, STEPS, start_at=later)
    store.create_run("never", "s", 1, {}, STEPS, start_at=later)
    assert {k: v for k, v in _check_against_rows(store).live.items() if v} == {("s", "scheduled"): 2}
    assert store.release_scheduled("later", later)
    assert store.cancel_scheduled("never")
    assert {k: v for k, v in _check_against_rows(store).live.items() if v} == {
        ("s", "pending"): 1, ("s", "cancelled"): 1}
    store.claim_step("later", 0, "later-a:0", [], 60)
    store.start_sleep("later", 0, "later-a:0", 3600)
    assert {k: v for k, v in _check_against_rows(store).live.items() if v} == {
        ("s", "waiting"): 1, ("s", "cancelled"): 1}


def test_a_live_status_total_counts_rows_so_a_hand_edit_cannot_leave_a_phantom(store):
    """An operator (or an old writer) moves a row past the transitions: the gauge no longer sees it, but the
    list's total for a live status counts rows, so nobody waits for a pending run that is not there."""
    store.create_run("edited", "s", 1, {}, STEPS)
    with store.engine.begin() as conn:
        conn.execute(t.runs.update().where(t.runs.c.id == "edited").values(status="failed"))
    runs, total = store.list_runs(status="pending")
    assert (runs, total, total.exact) == ([], 0, True)


def test_the_sweepers_compaction_sets_the_live_gauge_back_after_a_hand_edit(store):
    """Rows moved by hand past the transitions (a run marked failed, another put back to compensating, as an
    operator's UPDATE would): the next compaction (each sweep) corrects the live statuses, and a gauge that
    already agrees is left alone."""
    _succeeded(store, "ok")
    store.create_run("edited", "s", 1, {}, STEPS)
    store.compact_counters()
    assert store.counter_values().live[("s", "pending")] == 1
    with store.engine.begin() as conn:
        conn.execute(t.runs.update().where(t.runs.c.id == "edited").values(status="failed"))
        conn.execute(t.runs.update().where(t.runs.c.id == "ok").values(status="compensating"))
    store.compact_counters()
    live = store.counter_values().live
    assert live[("s", "pending")] == 0 and live[("s", "compensating")] == 1
    with store.engine.begin() as conn:
        assert counters.reconcile_live(conn) == 0  # nothing left to correct
