"""Parallel branches: the join of a group, a branch's failure, a branch that ends after the run began
compensating, and the order of undos around a group.

The branches of a group run as separate messages (compiler.Fanout) and meet only here, in SQL. Each
decision a branch makes about its group or the run (the join, "a sibling already failed", "the run is
compensating: undo me too", "nothing is left: the compensation ends") is made with the run row locked
(guards.lock_run), so two branches, or a branch and the last undo, decide one after the other, each seeing
what the other committed. Claims, retries and undos of branches use the ordinary transitions (claims.py,
compensation.py).

Compensation order: the group's branches are undone before the steps before the group. When the
compensation begins while a branch still runs, the undos of the earlier steps wait (hold_back) until every
branch of the group ended and every undo of the group is done; the transition that makes this true hands
them out (BranchOutcome.release, release_held_undos).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Sequence

from sqlalchemy import func, select, update

from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import BranchOutcome
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import (
    LIVE_RUN,
    claimable,
    event,
    fail_step,
    lock_run,
    move_step,
    results,
    succeed_run,
    to_compensate,
    touch,
)

LOST_BRANCH = ("the branch's worker process was lost while the run was compensating; it recorded no outcome, "
               "so nothing of it is undone")
# A branch that counts as done for the join of its group.
BRANCH_DONE = (StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value)
# A branch that may still end: its action runs, or (a child step) it waits for its child run. The undos of the
# steps before its group wait for it (hold_back), and the compensation cannot end before it (branches_unsettled).
BRANCH_LIVE = (StepStatus.RUNNING.value, StepStatus.WAITING.value)
_BRANCH = t.steps.c.branch_group.is_not(None)


def _late(live: bool, run_status: str) -> dict:
    return {} if live else {"late": True, "run_status": run_status}


class Groups(Engines):
    if TYPE_CHECKING:
        # Compensation's (Store derives from both). Declared, not inherited: compensation.py imports
        # branches_unsettled from here, so Groups(Compensation) would be an import cycle.
        def _finish_compensation(self, conn, run_id: str, now: dt.datetime) -> bool: ...

    def complete_branch(self, run_id: str, idx: int, token: str, result: Any) -> BranchOutcome | None:
        """Record a branch's result and, in the same transaction, decide what follows (BranchOutcome).
        Exactly one branch of a group sees every member done: it joins the group (event group_joined) and
        is the only one told to publish what follows. None when this delivery no longer holds the step."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            if run is None:
                return None
            held = move_step(conn, run_id, idx, StepStatus.RUNNING, token=token,
                             returning=[s.attempts, s.branch_group, s.has_compensation],
                             status=StepStatus.SUCCEEDED.value, result=result, error=None, finished_at=now,
                             lease_expires_at=None)
            if held is None:
                return None
            event(conn, run_id, EventKind.STEP_SUCCEEDED, held.name,
                  {"attempt": held.attempts, **_late(run.status in LIVE_RUN, run.status)}, now)
            touch(conn, run_id, now)
            return self._branch_decision(conn, run_id, run, idx, held.name, held.branch_group, now)

    def join_after_best_effort(self, run_id: str, idx: int) -> BranchOutcome | None:
        """A best-effort branch gave up and was recorded ``failed_best_effort`` (fail_best_effort,
        best_effort_lost): it counts as done for its group. Decide what follows as complete_branch does.
        None when the step is no such branch."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            step = conn.execute(select(s.name, s.status, s.branch_group)
                                .where(s.run_id == run_id, s.idx == idx)).first()
            if run is None or step is None or step.branch_group is None \
                    or step.status != StepStatus.FAILED_BEST_EFFORT.value:
                return None
            return self._branch_decision(conn, run_id, run, idx, step.name, step.branch_group, now)

    def _branch_decision(self, conn, run_id: str, run, idx: int, name: str, group: int,
                         now: dt.datetime) -> BranchOutcome:
        """Under the run lock, a branch just ended as done (succeeded, or failed_best_effort): what follows."""
        s, e = t.steps.c, t.events.c
        if run.status == RunStatus.COMPENSATING.value:
            # A sibling failed (or a cancel came in) while this branch ran: undo it too. Its own task
            # publishes the undo; without one, this may have been the last thing the run waited for.
            return self._late_end(conn, run_id, idx, run.status, "late", now)
        if run.status not in LIVE_RUN:
            return BranchOutcome("recorded")  # compensation_failed: the operator's retry undoes it
        if run.cancel_requested:
            return BranchOutcome("cancelled")
        members = conn.execute(select(s.idx, s.name, s.status).where(s.run_id == run_id, s.branch_group == group)).all()
        if any(m.status not in BRANCH_DONE for m in members):
            return BranchOutcome("waiting")
        joined = conn.execute(  # a best-effort branch's end is recorded before it decides: join once
            select(e.id).where(e.run_id == run_id, e.kind == EventKind.GROUP_JOINED.value,
                               e.step.in_([m.name for m in members]))
            .limit(1)
        ).first()
        if joined is not None:
            return BranchOutcome("waiting")
        event(conn, run_id, EventKind.GROUP_JOINED, name, {"group": group}, now)
        next_index = max(m.idx for m in members) + 1
        total = conn.execute(select(func.count()).select_from(t.steps).where(s.run_id == run_id)).scalar_one()
        if next_index < total:
            return BranchOutcome("joined", next_index=next_index, results=results(conn, run_id))
        succeed_run(conn, run_id, now, unless_cancelled=False)
        return BranchOutcome("finished")

    def fail_branch(self, run_id: str, idx: int, token: str, error: str,
                    traceback: str | None = None) -> BranchOutcome | None:
        """Record a branch's failure for good. Decides "errback" when its errback must begin the
        compensation; "quiet" when someone else already did or will (the run is compensating, or a sibling
        failed first and its errback is on its way): one errback per group failure. A late failure may end
        the compensation, or release the undos that waited. None when this delivery no longer holds the
        step."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            if run is None:
                return None
            live = run.status in LIVE_RUN
            held = fail_step(conn, run_id, idx, StepStatus.RUNNING, error, now, token=token,
                             detail={**_late(live, run.status), **({"traceback": traceback} if traceback else {})},
                             returning=[s.branch_group])
            if held is None:
                return None
            touch(conn, run_id, now)
            return self._failure_decision(conn, run_id, run.status, idx, held.branch_group, now)

    def _failure_decision(self, conn, run_id: str, run_status: str, idx: int, group: int,
                          now: dt.datetime) -> BranchOutcome:
        """Under the run lock, a branch just failed for good: the first failure of a live group fires the
        errback; a later one, or one after the compensation began, fires none (and may settle the group)."""
        s = t.steps.c
        if run_status not in LIVE_RUN:  # a non-atomic branch's own undo runs too (compensate)
            return self._late_end(conn, run_id, idx, run_status, "quiet", now)
        sibling_failed = conn.execute(
            select(s.idx).where(s.run_id == run_id, s.branch_group == group, s.idx != idx,
                                s.status == StepStatus.FAILED.value).limit(1)
        ).first()
        return BranchOutcome("quiet" if sibling_failed is not None else "errback")

    def end_child_branch(self, conn, run, idx: int, name: str, group: int, child_id: str, child_status: str,
                         child_results: dict | None, error: str | None, now: dt.datetime) -> BranchOutcome | None:
        """A child step that is a branch of group ``group`` saw its child run end (``child_status``; the
        caller holds the parent's run lock and checked the step waits for that child). Succeeded: the step
        succeeds with ``child_results`` and decides like any branch that ends done (the join, a cancel, or
        "late": the run began compensating meanwhile, so its own undo undoes the child). Any other end: the
        step fails with ``error`` and decides like any failing branch (one errback per group failure). None
        when the step no longer waits. Kept apart from the step's identity beyond ``idx`` so that another
        shape of fan-out can end its children the same way."""
        live = run.status in LIVE_RUN
        detail = {"child_run_id": child_id, **_late(live, run.status)}
        touch(conn, run.id, now)
        if child_status == RunStatus.SUCCEEDED.value:
            if move_step(conn, run.id, idx, StepStatus.WAITING, status=StepStatus.SUCCEEDED.value,
                         result=child_results, error=None, finished_at=now) is None:
                return None
            event(conn, run.id, EventKind.STEP_SUCCEEDED, name, detail, now)
            return self._branch_decision(conn, run.id, run, idx, name, group, now)
        if fail_step(conn, run.id, idx, StepStatus.WAITING, error or f"child run {child_id} ended {child_status}",
                     now, detail=detail) is None:
            return None
        return self._failure_decision(conn, run.id, run.status, idx, group, now)

    def stop_branch(self, run_id: str, idx: int, token: str, earlier_tokens: Sequence[str]) -> BranchOutcome | None:
        """A branch's retry (or redelivery) found the run no longer live: the run began compensating while
        the branch waited to run again. Record the branch as failed (it never succeeded, so nothing of it is
        undone) and end the compensation, or release the undos that waited, if it was the last thing the run
        waited for. Only a delivery that could have claimed the step acts (a duplicate of a live holder
        changes nothing: None)."""
        now = utcnow()
        reason = "stopped: the run began compensating while the branch waited to run again"
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            if run is None or run.status in LIVE_RUN:
                return None
            may_claim = claimable(StepStatus.PENDING, StepStatus.RUNNING, token, earlier_tokens, now)
            if fail_step(conn, run_id, idx, StepStatus.RUNNING, reason, now, where=[_BRANCH, may_claim],
                         detail=_late(False, run.status)) is None:
                return None
            return self._late_end(conn, run_id, idx, run.status, "stopped", now)

    def settle_lost_branch(self, run_id: str, idx: int, lost_error: str) -> BranchOutcome | None:
        """The errback of a branch that ended after the run began compensating, without recording its own
        outcome (its process was lost, or killed at its hard time limit): record it as failed and end the
        compensation, or release the undos that waited, if it was the last thing the run waited for. None
        (changing nothing) when the run is still live or the step is no running branch: the caller goes on
        as for any errback."""
        now = utcnow()
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            if run is None or run.status in LIVE_RUN:
                return None
            if fail_step(conn, run_id, idx, StepStatus.RUNNING, lost_error, now, where=[_BRANCH],
                         detail=_late(False, run.status)) is None:
                return None
            return self._late_end(conn, run_id, idx, run.status, "lost", now)

    def hold_back(self, run_id: str, todo: list[int]) -> list[int]:
        """Of ``todo`` (undos about to be published, latest first), those to publish now. While a branch of
        the group the run stopped in still runs, or a late branch's own undo is still to come, the steps
        before that group wait: the transition that settles the group releases them (BranchOutcome.release,
        release_held_undos). The event undos_held records that they wait, undos_released that they went."""
        s = t.steps.c
        now = utcnow()
        with self.engine.begin() as conn:
            lock_run(conn, run_id)
            group = _open_group(conn, run_id)
            if group is None:
                return todo
            members = conn.execute(
                select(s.idx, s.status).where(s.run_id == run_id, s.branch_group == group)
            ).all()
            undos = to_compensate(conn, run_id, in_progress=True)
            waiting = any(m.status in BRANCH_LIVE or (m.idx in undos and m.idx not in todo) for m in members)
            now_todo = [i for i in todo if i >= group] if waiting else todo
            if now_todo != todo:
                event(conn, run_id, EventKind.UNDOS_HELD, None,
                      {"steps": [i for i in todo if i < group], "until": "the parallel group settles"}, now)
        return now_todo

    def release_held_undos(self, run_id: str) -> list[int]:
        """After an undo of a group's branch: the undos that waited for the group (hold_back), latest first,
        if the group is settled now; else nothing."""
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            if run is None or run.status != RunStatus.COMPENSATING.value:
                return []
            return _held_undos(conn, run_id, utcnow())

    def _late_end(self, conn, run_id: str, idx: int, run_status: str, decision: str,
                  now: dt.datetime) -> BranchOutcome:
        """A branch ended after the run left ``running`` (under the run lock): if it has an undo to do (it
        succeeded, or a non-atomic branch failed), its own task publishes that; else it may settle its group
        (release the undos that waited) or end the compensation."""
        if run_status == RunStatus.COMPENSATING.value and idx in to_compensate(conn, run_id):
            return BranchOutcome(decision, compensate=True)
        return BranchOutcome(decision, release=self._settle_compensation(conn, run_id, run_status, now))

    def _settle_compensation(self, conn, run_id: str, run_status: str, now: dt.datetime) -> tuple[int, ...]:
        """A late branch ended (under the run lock): release the undos that waited for its group, or end
        the compensation when nothing is left."""
        if run_status != RunStatus.COMPENSATING.value:
            return ()
        held = _held_undos(conn, run_id, now)
        if held:
            return tuple(held)
        if not to_compensate(conn, run_id, in_progress=True):
            self._finish_compensation(conn, run_id, now)
        return ()



def _open_group(conn, run_id: str) -> int | None:
    """The group the run stopped in: the group of the latest step that started, if that is a branch."""
    s = t.steps.c
    latest = conn.execute(
        select(s.branch_group)
        .where(s.run_id == run_id, s.status.not_in([StepStatus.PENDING.value, StepStatus.SKIPPED.value]))
        .order_by(s.idx.desc()).limit(1)
    ).first()
    return latest.branch_group if latest is not None else None


def _held_undos(conn, run_id: str, now: dt.datetime) -> list[int]:
    """Under the run lock: if undos wait for the open group (hold_back) and now no branch of the group runs
    and none of its undos is left, those still to do (recorded as undos_released: handed out once)."""
    s = t.steps.c
    group = _open_group(conn, run_id)
    if group is None or not _undos_held(conn, run_id):
        return []
    members = conn.execute(select(s.idx, s.status).where(s.run_id == run_id, s.branch_group == group)).all()
    undos = to_compensate(conn, run_id, in_progress=True)
    if any(m.status in BRANCH_LIVE or m.idx in undos for m in members):
        return []
    before = [i for i in undos if i < group]
    event(conn, run_id, EventKind.UNDOS_RELEASED, None, {"steps": before}, now)
    return before


def undos_after_child_branch(conn, run_id: str, group: int) -> list[int]:
    """Under the run lock: a child branch's child run finished undoing, so its compensation chain, cut at
    that branch, goes on. Latest first: the undos still to do (those in progress too: claims make a second
    delivery harmless), or only those of the group while the steps before it wait for the group (hold_back):
    the transition that settles the group releases those."""
    todo = to_compensate(conn, run_id, in_progress=True)
    if _undos_held(conn, run_id):
        return [i for i in todo if i >= group]
    return todo


def _undos_held(conn, run_id: str) -> bool:
    """The undos of the steps before the open group wait for it (undos_held, not yet undos_released)."""
    e = t.events.c
    last = conn.execute(
        select(e.kind)
        .where(e.run_id == run_id, e.kind.in_([EventKind.UNDOS_HELD.value, EventKind.UNDOS_RELEASED.value]))
        .order_by(e.id.desc()).limit(1)
    ).scalar()
    return last == EventKind.UNDOS_HELD


def settle_lost_branches(conn, run_id: str, now: dt.datetime) -> None:
    """Recovery of a compensating run: a branch still marked running whose claim was taken back (its
    holder died; take_over_stalled) can no longer record anything: it failed (lost)."""
    s = t.steps.c
    lost = conn.execute(
        update(t.steps)
        .where(s.run_id == run_id, _BRANCH, s.status == StepStatus.RUNNING.value, s.claim.is_(None))
        .values(status=StepStatus.FAILED.value, error=LOST_BRANCH, finished_at=now, lease_expires_at=None)
        .returning(s.name)
    ).all()
    for row in lost:
        event(conn, run_id, EventKind.STEP_FAILED, row.name, {"error": LOST_BRANCH, "late": True}, now)


def branches_unsettled(conn, run_id: str) -> bool:
    """For a run with parallel groups, whether its compensation must stay open: a branch still runs (it
    will record its outcome and, if it succeeded, publish its own undo), or an undo is still to do (a
    late branch succeeded after the caller looked). Locks the run row first, so the last undo and a late
    branch decide one after the other. False at once for a run without groups."""
    s = t.steps.c
    if conn.execute(select(s.idx).where(s.run_id == run_id, _BRANCH).limit(1)).first() is None:
        return False
    lock_run(conn, run_id)
    running = conn.execute(
        select(s.idx).where(s.run_id == run_id, _BRANCH, s.status.in_(BRANCH_LIVE)).limit(1)
    ).first()
    return running is not None or bool(to_compensate(conn, run_id, in_progress=True))
