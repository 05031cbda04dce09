"""What the recovery sweeper sees and decides, on SQLite with no broker: which runs count as stalled, that
a re-drive is claimed once, and what SQL says to publish."""

import time

from sagaflow.model import ClaimOutcome as C

STEPS = [("a", True), ("b", True), ("c", False)]


def new_run(store, run_id="r1"):
    store.create_run(run_id, "s", 1, {"x": 1}, STEPS)


def stalled(store, stall=60.0):
    return [run_id for run_id, _ in store.stalled_runs(stall)]


def take_over(store, run_id, stall=60.0):
    seen = dict(store.stalled_runs(stall))[run_id]
    return store.take_over_stalled(run_id, seen, stall)


def test_a_run_whose_holder_is_alive_is_not_stalled(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 60)
    assert stalled(store, stall=0) == []


def test_an_expired_lease_stalls_the_run_at_once_and_the_step_is_given_to_a_new_delivery(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 0.05)
    time.sleep(0.1)
    assert stalled(store) == ["r1"]  # no need to wait for the stall timeout: the holder is gone
    recovery = take_over(store, "r1")
    assert (recovery.action, recovery.index, recovery.results, recovery.revoked) == ("resume", 0, {}, ("a",))
    assert stalled(store) == []  # the re-drive counts as progress
    claim = store.claim_step("r1", 0, "new:0", [], 60)  # the sweeper's message
    assert claim.outcome is C.CLAIMED and claim.attempt == 2
    assert store.claim_step("r1", 0, "t0:0", [], 60).outcome is C.BUSY  # the dead holder's redelivery, late
    assert not store.complete_step("r1", 0, "t0:0", {"late": True})  # its result, if it was alive after all


def test_a_run_that_did_not_move_for_the_stall_timeout_resumes_after_its_last_completed_step(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 60)
    store.complete_step("r1", 0, "t0:0", {"id": 7})
    assert stalled(store, stall=60) == []
    time.sleep(0.05)
    recovery = take_over(store, "r1", stall=0.01)
    assert (recovery.action, recovery.index, recovery.results) == ("resume", 1, {"a": {"id": 7}})
    assert [e.kind for e in store.get_run("r1").events][-1] == "run_recovered"


def test_two_sweepers_seeing_the_same_stall_re_drive_it_once(store):
    new_run(store)
    time.sleep(0.05)
    (run_id, seen), = store.stalled_runs(0.01)
    first = store.take_over_stalled(run_id, seen, 0.01)
    second = store.take_over_stalled(run_id, seen, 0.01)
    assert first is not None and first.action == "resume" and first.index == 0
    assert second is None
    assert [e.kind for e in store.get_run("r1").events].count("run_recovered") == 1


def test_a_run_that_moved_after_the_sweeper_looked_is_left_alone(store):
    new_run(store)
    time.sleep(0.05)
    (run_id, seen), = store.stalled_runs(0.01)
    store.claim_step("r1", 0, "t0:0", [], 60)  # a worker picked it up meanwhile
    assert store.take_over_stalled(run_id, seen, 0.01) is None


def test_every_step_done_means_publish_finish_and_a_recorded_failure_means_the_errback(store):
    new_run(store, "done")
    for i in range(3):
        store.claim_step("done", i, f"t{i}:0", [], 60)
        store.complete_step("done", i, f"t{i}:0", i)
    new_run(store, "failed")
    store.claim_step("failed", 0, "t0:0", [], 60)
    store.fail_step("failed", 0, "t0:0", "boom")
    time.sleep(0.05)
    assert take_over(store, "done", 0.01).action == "finish"
    assert take_over(store, "failed", 0.01).action == "errback"


def test_a_stalled_compensation_restarts_from_the_undo_in_progress(store):
    new_run(store)
    for i in range(2):
        store.claim_step("r1", i, f"t{i}:0", [], 60)
        store.complete_step("r1", i, f"t{i}:0", i)
    store.claim_step("r1", 2, "t2:0", [], 60)
    store.fail_step("r1", 2, "t2:0", "boom")
    assert store.begin_compensation("r1", 2, "lost") == [1, 0]
    store.claim_compensation("r1", 1, "u1:0", [], 0.05)  # its worker dies
    time.sleep(0.1)
    recovery = take_over(store, "r1")
    assert (recovery.action, recovery.indexes, recovery.revoked) == ("compensate", (1, 0), ("b",))
    claim = store.claim_compensation("r1", 1, "new:0", [], 60)
    assert claim.outcome is C.CLAIMED and claim.attempt == 2


def test_final_runs_and_runs_waiting_for_an_operator_are_never_stalled(store):
    new_run(store)
    for i in range(3):
        store.claim_step("r1", i, f"t{i}:0", [], 60)
        store.complete_step("r1", i, f"t{i}:0", i)
    store.finish_run("r1")
    time.sleep(0.05)
    assert stalled(store, 0.01) == []


def test_a_heartbeat_extends_the_lease_and_tells_a_stale_holder_and_a_cancel(store):
    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 0.05)
    assert store.extend_lease("r1", 0, "t0:0", 60) == (True, False)
    time.sleep(0.1)
    assert stalled(store) == []  # alive thanks to the heartbeat
    store.request_cancel("r1")
    assert store.extend_lease("r1", 0, "t0:0", 60) == (True, True)
    assert store.extend_lease("r1", 0, "other:0", 60) == (False, True)


def test_a_step_that_finished_within_the_stall_timeout_counts_as_progress(store):
    # A step's success moves no run column (one write less per step): its finished_at is the progress.
    import datetime as dt

    from sqlalchemy import update

    from sagaflow.store import tables as t

    new_run(store)
    store.claim_step("r1", 0, "t0:0", [], 60)
    store.complete_step("r1", 0, "t0:0", {"id": 7})
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    with store.engine.begin() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == "r1").values(updated_at=long_ago))
    assert stalled(store, stall=60) == []  # step a finished just now
    with store.engine.begin() as conn:
        conn.execute(update(t.steps).where(t.steps.c.run_id == "r1").values(finished_at=long_ago))
    assert stalled(store, stall=60) == ["r1"]


def _undo_of_b_gave_up(store):
    """a and b done, c failed; the undo of b gave up (compensation_failed recorded) and its errback, which
    ends the run compensation_failed, was lost (RabbitMQ delivered it to a worker of another database in the
    short soak)."""
    new_run(store)
    for i in range(2):
        store.claim_step("r1", i, f"t{i}:0", [], 60)
        store.complete_step("r1", i, f"t{i}:0", i)
    store.claim_step("r1", 2, "t2:0", [], 60)
    store.fail_step("r1", 2, "t2:0", "boom")
    assert store.begin_compensation("r1", 2, "lost") == [1, 0]
    assert store.claim_compensation("r1", 1, "u1:0", [], 60).outcome is C.CLAIMED
    assert store.fail_compensation("r1", 1, "u1:0", "undo b: gave up")


def test_an_undo_that_gave_up_with_its_errback_lost_is_re_driven_as_that_errback_not_the_earlier_undos(store):
    _undo_of_b_gave_up(store)
    time.sleep(0.05)
    recovery = take_over(store, "r1", stall=0.01)
    # Before: ("compensate", (0,)): the sweeper undid a, and that undo ended the run "compensated" with b's
    # undo missing.
    assert (recovery.action, recovery.index, recovery.indexes) == ("compensation_errback", 1, ())
    assert store.get_run("r1").events[-1].detail["from_step"] == "b"
    assert store.mark_compensation_failed("r1", 1, "lost")  # what that errback does
    run = store.get_run("r1")
    assert run.status == "compensation_failed" and "undo b: gave up" in run.error
    assert [s.status for s in run.steps] == ["succeeded", "compensation_failed", "failed"]


def test_a_run_with_an_undo_that_gave_up_never_ends_compensated(store):
    _undo_of_b_gave_up(store)
    # Any other undo that completes now (a duplicate chain, a parallel branch) leaves the run compensating.
    assert store.claim_compensation("r1", 0, "u0:0", [], 60).outcome is C.CLAIMED
    assert store.complete_compensation("r1", 0, "u0:0") == "compensating"
    assert not store.finish_compensation("r1")  # the sweeper's finish_compensation task, likewise
    assert store.get_run("r1").status == "compensating"
    assert store.mark_compensation_failed("r1", 1, "lost")
    assert store.get_run("r1").status == "compensation_failed"


# ---------------------------------------------------------------------------------------------- child branches


def _kids_run(store, run_id="k1", statuses=("succeeded", "waiting", "succeeded", "pending"), run_status="running"):
    """open -> (kid_a | kid_b: child branches) -> total, with the step statuses given."""
    from sqlalchemy import update

    from sagaflow.model import StepSpec
    from sagaflow.store import tables as t

    store.create_run(run_id, "kids", 1, {}, [StepSpec("open", True), StepSpec("kid_a", True, kind="child", group=1),
                                             StepSpec("kid_b", True, kind="child", group=1), StepSpec("total", True)])
    with store.engine.begin() as conn:
        for idx, status in enumerate(statuses):
            conn.execute(update(t.steps).where(t.steps.c.run_id == run_id, t.steps.c.idx == idx)
                         .values(status=status))
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(status=run_status))


def test_a_run_whose_open_branches_only_wait_for_their_children_is_quiet_not_stalled(store):
    _kids_run(store)
    time.sleep(0.05)
    assert stalled(store, stall=0.01) == []
    _kids_run(store, "k2", ("compensated", "waiting", "compensated", "skipped"), "compensating")  # a late one
    time.sleep(0.05)
    assert stalled(store, stall=0.01) == []


def test_a_lost_sibling_beside_a_waiting_child_branch_publishes_the_group_again(store):
    _kids_run(store, statuses=("succeeded", "waiting", "pending", "pending"))
    time.sleep(0.05)
    recovery = take_over(store, "k1", stall=0.01)
    assert (recovery.action, recovery.index) == ("resume", 1)  # compile_run fans the whole group out
    # The waiting child branch's copy is a duplicate: its claim finds it busy.
    assert store.transactional.claim_step("k1", 1, "copy:0", [], 60).outcome is C.BUSY


def test_a_failed_sibling_beside_a_waiting_child_branch_gets_its_errback_again(store):
    _kids_run(store, statuses=("succeeded", "waiting", "failed", "pending"))
    time.sleep(0.05)
    recovery = take_over(store, "k1", stall=0.01)
    assert (recovery.action, recovery.index) == ("errback", 2)


def test_a_stalled_compensation_leaves_the_steps_before_a_late_child_branch_for_later(store):
    # kid_b's undo holder died (compensating, no claim); kid_a still waits for its child (late).
    _kids_run(store, statuses=("succeeded", "waiting", "compensating", "skipped"), run_status="compensating")
    time.sleep(0.05)
    recovery = take_over(store, "k1", stall=0.01)
    assert (recovery.action, recovery.indexes) == ("compensate", (2,))  # not "open" (0): after the group
