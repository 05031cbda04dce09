"""Child runs: a step that starts a run of another saga and waits for its end, the child's end moving its
parent on, the undo of a child run, and the children whose end was never reported. The locking rules are
waits.py's (a parent's run row before its child's).

A child step may be a branch of a parallel group: the run then keeps running while the step waits, and the
child's end is decided by its group (Groups.end_child_branch: the join, one errback per group failure, a
late success undone). Its undo is the same as a child step's."""

from __future__ import annotations

import datetime as dt
from typing import Callable, Iterable

from sqlalchemy import and_, or_, select, update

from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import MapOutcome, WaitOutcome
from sagaflow.model.snapshots import StepSpec
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.compensation import Compensation
from sagaflow.store.engine import utcnow
from sagaflow.store.groups import Groups, undos_after_child_branch
from sagaflow.store.guards import (
    event,
    fail_step,
    held_step,
    move_step,
    results,
    set_run_status,
    to_compensate,
    touch,
)
from sagaflow.store.maps import FAILED, RUNNING, SKIPPED, SUCCEEDED, Maps, item_row
from sagaflow.store.runs import insert_run
from sagaflow.store.waits import Waits, enter_wait, lock_wait_run

# A child run in one of these has ended for its parent: succeeded, or it can no longer succeed. ``stuck``
# is not among them: an operator may still take that run forward.
CHILD_ENDED = (RunStatus.SUCCEEDED.value, RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value,
               RunStatus.FAILED.value, RunStatus.COMPENSATION_FAILED.value)
CHILD_UNDONE = (RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value, RunStatus.COMPENSATION_FAILED.value)
# A parent that may wait for a child's end: at a child step (waiting), or at a child branch of a parallel group
# (running, or compensating: a late branch).
CHILD_PARENT = (RunStatus.WAITING.value, RunStatus.RUNNING.value, RunStatus.COMPENSATING.value)


# A map's item whose child ended: (the parent's saga, its version, the map's index) -> (the map's
# concurrency, an item's lease), read from the definition by the runtime (the store keeps neither).
MapWindow = Callable[[str, int, int], "tuple[int, float]"]


class Children(Groups, Compensation, Waits, Maps):
    def start_child(self, run_id: str, idx: int, token: str, child_id: str, child_saga: str, child_version: int,
                    child_input: dict, steps: Iterable[StepSpec]) -> WaitOutcome:
        """The child step ``idx`` (held by ``token``) is reached: record the child run (idempotency key
        ``child:<run_id>:<step name>``, so a redelivery never makes two) and its link, the step and the run
        wait. The caller publishes the child's chain (``child_run_id``); if that publish is lost, the child
        stays pending and the recovery sweeper starts it. A cancel that came in since the claim fails the
        step instead, and no child is created."""
        now = utcnow()
        r = t.runs.c
        steps = list(steps)
        with self.engine.begin() as conn:
            run, step, base, stop = enter_wait(conn, run_id, idx, token, now,
                                               lambda step: "cancelled before the child run started",
                                               t.steps.c.branch_group)
            if stop is not None:
                return stop
            key = f"child:{run_id}:{step.name}"
            existing = conn.execute(select(r.id, r.saga).where(r.idempotency_key == key)).first()
            if existing is not None:
                child_id, child_saga = existing.id, existing.saga
            if move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, status=StepStatus.WAITING.value,
                         child_run_id=child_id, claim=None, lease_expires_at=None) is None:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            if existing is None:
                priority = conn.execute(select(t.runs.c.priority).where(t.runs.c.id == run_id)).scalar() or 0
                insert_run(conn, child_id, child_saga, child_version, child_input, key, steps, now,
                           parent_run_id=run_id, parent_step=idx, priority=priority)  # the child's: its parent's
            # A branch of a parallel group: the run keeps running for its other branches, only the step
            # waits (the group joins once the child ends: groups.end_child_branch).
            branch = step.branch_group is not None
            if not branch:
                set_run_status(conn, run_id, RunStatus.RUNNING, RunStatus.WAITING, now)
            event(conn, run_id, EventKind.RUN_WAITING, step.name,
                  {"child_run_id": child_id, "child_saga": child_saga, **({"branch": True} if branch else {})}, now)
        return WaitOutcome("waiting", child_run_id=child_id, **base)

    def start_item_child(self, run_id: str, idx: int, item: int, token: str, child_id: str, child_saga: str,
                         child_version: int, child_input: dict, steps: Iterable[StepSpec], concurrency: int,
                         lease: float) -> WaitOutcome:
        """Item ``item`` of the map step ``idx`` (held by ``token``) runs as a child run: record the child
        (idempotency key ``child:<run_id>:<map>:<item>``, so a redelivery never makes two; its parent link
        names the map step and the item) and the item's link to it. The item stays in flight, holding no
        worker and no lease: the child's end moves it (child_ended). The caller publishes the child's chain
        (``child_run_id``, "waiting"). A map that is failing (an item failed, a cancel came in) since the
        claim skips the item instead, starting no child ("map": what its map decided). "lost": this
        delivery no longer holds the item."""
        now = utcnow()
        r, s, m = t.runs.c, t.steps.c, t.map_items.c
        steps = list(steps)
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            step = conn.execute(select(s.name, s.status).where(s.run_id == run_id, s.idx == idx)).first()
            if run is None or step is None:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            base = dict(run_id=run_id, saga=run.saga, version=run.saga_version, index=idx)
            held = and_(item_row(run_id, idx, item), m.status == RUNNING, m.claim == token)
            if step.status != StepStatus.RUNNING.value or self._failing(conn, run, run_id, idx):
                if conn.execute(update(t.map_items).where(held)
                                .values(status=SKIPPED, claim=None, lease_expires_at=None, finished_at=now)
                                .returning(m.item)).first() is None:
                    return WaitOutcome("lost", **base)
                after = (self._advance(conn, run, run_id, idx, step.name, concurrency, lease, now)
                         if step.status == StepStatus.RUNNING.value else MapOutcome("gone"))
                return WaitOutcome("map", map=after, **base)
            key = f"child:{run_id}:{step.name}:{item}"
            existing = conn.execute(select(r.id, r.saga).where(r.idempotency_key == key)).first()
            if existing is not None:
                child_id, child_saga = existing.id, existing.saga
            # The claim names the child (never null: a null claim of a running item is claimable).
            if conn.execute(update(t.map_items).where(held)
                            .values(claim=f"child:{child_id}", lease_expires_at=None, child_run_id=child_id)
                            .returning(m.item)).first() is None:
                return WaitOutcome("lost", **base)
            if existing is None:
                priority = conn.execute(select(r.priority).where(r.id == run_id)).scalar() or 0
                insert_run(conn, child_id, child_saga, child_version, child_input, key, steps, now,
                           parent_run_id=run_id, parent_step=idx, parent_item=item, priority=priority)
            self._push_lease(conn, run_id, idx, now, lease)
        return WaitOutcome("waiting", child_run_id=child_id, **base)

    def parent_of(self, run_id: str) -> str | None:
        return self._read(lambda conn: conn.execute(
            select(t.runs.c.parent_run_id).where(t.runs.c.id == run_id)).scalar())

    def child_ended(self, child_id: str, window: MapWindow | None = None) -> WaitOutcome:
        """The child run ended (or finished undoing): move its parent's step on. Forward (the step waits):
        child succeeded -> step succeeded with the child's results ({child step: result}), the parent goes
        on; any other end -> step failed, the errback compensates the parent. Backward (the step's
        compensation waits for the child's): revoke the step's claim and hand back the parent's
        compensations from that step, whose task then decides from the child's status. A duplicate, or a
        child that has not ended, changes nothing ("none"). The child of a map's item: see _item_child_ended
        (``window`` gives the map's concurrency and lease)."""
        now = utcnow()
        s, r = t.steps.c, t.runs.c
        with self.engine.begin() as conn:
            child = conn.execute(select(r.status, r.saga, r.error, r.parent_run_id, r.parent_step, r.parent_item)
                                 .where(r.id == child_id)).first()
            if child is None or child.parent_run_id is None:
                return WaitOutcome("none", run_id=child_id)
            run = lock_wait_run(conn, child.parent_run_id)
            if run is None:  # the parent was deleted
                return WaitOutcome("none", run_id=child_id)
            idx = child.parent_step
            step = conn.execute(select(s.name, s.status, s.child_run_id, s.branch_group)
                                .where(s.run_id == run.id, s.idx == idx)).first()
            base = dict(run_id=run.id, saga=run.saga, version=run.saga_version, index=idx, child_run_id=child_id)
            if step is not None and child.parent_item is not None:
                return self._item_child_ended(conn, run, idx, child.parent_item, step, child_id, child, window,
                                              base, now)
            if step is None or step.child_run_id != child_id:
                return WaitOutcome("none", **base)
            if step.branch_group is not None and step.status == StepStatus.WAITING.value \
                    and child.status in CHILD_ENDED:
                # A branch of a parallel group: its group decides (the join, one errback, a late undo).
                error = (f"child run {child_id} (saga {child.saga!r}) ended {child.status}"
                         + (f": {child.error}" if child.error else ""))
                branch = self.end_child_branch(
                    conn, run, idx, step.name, step.branch_group, child_id, child.status,
                    results(conn, child_id) if child.status == RunStatus.SUCCEEDED.value else None, error, now)
                if branch is None:
                    return WaitOutcome("none", **base)
                return WaitOutcome("branch", branch=branch, error=error, **base)
            if step.status == StepStatus.WAITING.value and run.status == RunStatus.WAITING.value \
                    and child.status in CHILD_ENDED:
                if child.status == RunStatus.SUCCEEDED.value:
                    child_results = results(conn, child_id)
                    if move_step(conn, run.id, idx, StepStatus.WAITING, status=StepStatus.SUCCEEDED.value,
                                 result=child_results, error=None, finished_at=now) is None:
                        return WaitOutcome("none", **base)
                    return self._pass_step(conn, run, idx, step.name, child_results, {"child_run_id": child_id},
                                           now, StepStatus.WAITING)
                error = (f"child run {child_id} (saga {child.saga!r}) ended {child.status}"
                         + (f": {child.error}" if child.error else ""))
                if fail_step(conn, run.id, idx, StepStatus.WAITING, error, now,
                             detail={"child_run_id": child_id}) is None:
                    return WaitOutcome("none", **base)
                set_run_status(conn, run.id, RunStatus.WAITING, RunStatus.RUNNING, now)
                return WaitOutcome("errback", error=error, **base)
            if step.status == StepStatus.COMPENSATING.value and run.status == RunStatus.COMPENSATING.value \
                    and child.status in CHILD_UNDONE:
                if move_step(conn, run.id, idx, StepStatus.COMPENSATING, claim=None, lease_expires_at=None) is None:
                    return WaitOutcome("none", **base)
                touch(conn, run.id, now)
                todo = (to_compensate(conn, run.id, in_progress=True) if step.branch_group is None
                        else undos_after_child_branch(conn, run.id, step.branch_group))
                return WaitOutcome("compensate", indexes=tuple(todo), status=child.status, **base)
        return WaitOutcome("none", **base)

    def _item_child_ended(self, conn, run, idx: int, item: int, step, child_id: str, child, window,
                          base: dict, now) -> WaitOutcome:
        """Under the parent's lock: the child run of item ``item`` of the map step ``idx`` ended, or finished
        undoing. Forward (the item is in flight): the child succeeded -> the item succeeded with the child's
        results; any other end -> the item failed for good; either way its map decides as for any item's end
        ("map": refill the window, end the map, fire its errback; a late success is recorded, so the map's
        undo undoes it). Backward (the map's undo waits for this child's): revoke the map step's
        compensation claim and hand back the compensations from the map step, whose task goes on with the
        next item. Anything else: "none"."""
        m = t.map_items.c
        row = conn.execute(select(m.status).where(item_row(run.id, idx, item), m.child_run_id == child_id)).first()
        if row is None:
            return WaitOutcome("none", **base)
        if row.status == RUNNING and child.status in CHILD_ENDED and window is not None:
            concurrency, lease = window(run.saga, run.saga_version, idx)
            error = None
            if child.status == RunStatus.SUCCEEDED.value:
                values = dict(status=SUCCEEDED, result=results(conn, child_id), error=None)
            else:
                error = (f"child run {child_id} (saga {child.saga!r}) ended {child.status}"
                         + (f": {child.error}" if child.error else ""))
                values = dict(status=FAILED, error=error)
            if conn.execute(update(t.map_items)
                            .where(item_row(run.id, idx, item), m.status == RUNNING, m.child_run_id == child_id)
                            .values(claim=None, lease_expires_at=None, finished_at=now, **values)
                            .returning(m.item)).first() is None:
                return WaitOutcome("none", **base)
            if error is not None:
                event(conn, run.id, EventKind.MAP_ITEM_FAILED, step.name,
                      {"item": item, "error": error, "child_run_id": child_id}, now)
            after = (self._advance(conn, run, run.id, idx, step.name, concurrency, lease, now)
                     if step.status == StepStatus.RUNNING.value else MapOutcome("gone"))
            return WaitOutcome("map", map=after, error=error, **base)
        if row.status == SUCCEEDED and step.status == StepStatus.COMPENSATING.value \
                and run.status == RunStatus.COMPENSATING.value and child.status in CHILD_UNDONE:
            if move_step(conn, run.id, idx, StepStatus.COMPENSATING, claim=None, lease_expires_at=None) is None:
                return WaitOutcome("none", **base)
            touch(conn, run.id, now)
            return WaitOutcome("compensate", indexes=tuple(to_compensate(conn, run.id, in_progress=True)),
                               status=child.status, **base)
        return WaitOutcome("none", **base)

    def compensate_item_child(self, run_id: str, idx: int, item: int, token: str, fresh: bool) -> WaitOutcome:
        """Within the undo of the map step ``idx`` (held by ``token``): undo the child run of item ``item``,
        as compensate_child undoes a child step's ("finished": the child is undone, or there is nothing to
        undo; "waiting"/"compensate": its undo runs, and its end hands the map's undo back; "failed")."""
        now = utcnow()
        m = t.map_items.c
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            step = held_step(conn, run_id, idx, token, StepStatus.COMPENSATING)
            if run is None or step is None:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            child_id = conn.execute(select(m.child_run_id).where(item_row(run_id, idx, item))).scalar()
            return self._undo_child(conn, run_id, idx, child_id, fresh, now)

    def compensate_child(self, run_id: str, idx: int, token: str, fresh: bool) -> WaitOutcome:
        """The compensation of child step ``idx`` (held by ``token``): undo the child run. Child succeeded
        -> compensating, with its completed steps to undo ("compensate" them, on the child; its end wakes this
        step again); nothing to undo, or already undone -> "finished" (complete this step). Child still
        compensating -> "waiting". Child in compensation_failed: a ``fresh`` round (the first, or an
        operator's retry of the parent) retries the child's compensations; a later delivery of the same
        round gives up ("failed": the parent waits for an operator too)."""
        now = utcnow()
        s = t.steps.c
        with self.engine.begin() as conn:
            run = lock_wait_run(conn, run_id)
            step = held_step(conn, run_id, idx, token, StepStatus.COMPENSATING, s.child_run_id)
            if run is None or step is None:
                return WaitOutcome("lost", run_id=run_id, index=idx)
            return self._undo_child(conn, run_id, idx, step.child_run_id, fresh, now)

    def _undo_child(self, conn, run_id: str, idx: int, child_id: str | None, fresh: bool, now) -> WaitOutcome:
        """Under the parent's lock, its step ``idx`` compensating: undo the child run ``child_id`` (a child
        step's, or a map item's). See compensate_child."""
        s = t.steps.c
        if child_id is None:  # the child was never recorded: nothing ran, nothing to undo
            return WaitOutcome("finished", run_id=run_id, index=idx)
        child = lock_wait_run(conn, child_id)
        if child is None:  # deleted by hand: there is nothing left to undo
            return WaitOutcome("finished", run_id=run_id, index=idx, child_run_id=child_id)
        base = dict(run_id=child.id, saga=child.saga, version=child.saga_version, index=idx,
                    child_run_id=child.id, status=child.status)
        if child.status in (RunStatus.COMPENSATED.value, RunStatus.CANCELLED.value):
            return WaitOutcome("finished", **base)
        if child.status == RunStatus.COMPENSATING.value:
            return WaitOutcome("waiting", **base)
        if child.status == RunStatus.SUCCEEDED.value:
            set_run_status(conn, child.id, RunStatus.SUCCEEDED, RunStatus.COMPENSATING, now, finished_at=None)
            event(conn, child.id, EventKind.COMPENSATION_REQUESTED, None,
                  {"parent_run_id": run_id, "parent_step": idx}, now)
        elif child.status == RunStatus.COMPENSATION_FAILED.value and fresh:
            set_run_status(conn, child.id, RunStatus.COMPENSATION_FAILED, RunStatus.COMPENSATING, now,
                           error=None, finished_at=None)
            conn.execute(update(t.steps)
                         .where(s.run_id == child.id, s.status == StepStatus.COMPENSATION_FAILED.value)
                         .values(status=StepStatus.SUCCEEDED.value, claim=None, lease_expires_at=None))
            event(conn, child.id, EventKind.RETRY_REQUESTED, None, {"parent_run_id": run_id}, now)
        else:
            error = (f"child run {child.id} is {child.status}"
                     + (f": {child.error}" if child.error else "")
                     + f"; fix the cause, then `sagaflow retry {run_id}` (it retries the child's undo too)")
            return WaitOutcome("failed", error=error, **base)
        todo = to_compensate(conn, child.id)
        if not todo:
            self._finish_compensation(conn, child.id, now)
            return WaitOutcome("finished", **base)
        touch(conn, run_id, now)
        return WaitOutcome("compensate", indexes=tuple(todo), **base)

    def unreported_children(self, stall_timeout: float, limit: int = 500) -> list[str]:
        """Child runs that ended (or finished undoing) over ``stall_timeout`` seconds ago while their parent's
        step still waits for them: the child_finished message was lost. The sweeper publishes it again."""
        r, s = t.runs.c, t.steps.c
        child = t.runs.alias("child")
        c = child.c
        now = utcnow()
        # A linear child step waits with its run; a branch's run keeps running (or began compensating).
        forward = and_(s.status == StepStatus.WAITING.value, c.status.in_(CHILD_ENDED),
                       or_(r.status == RunStatus.WAITING.value, s.branch_group.is_not(None)))
        backward = and_(s.status == StepStatus.COMPENSATING.value, r.status == RunStatus.COMPENSATING.value,
                        c.status.in_(CHILD_UNDONE))
        quiet = c.updated_at < now - dt.timedelta(seconds=stall_timeout)
        # A map's item in flight waits for its child (the map runs); an item that succeeded waits for its
        # child's undo while the map step compensates.
        m = t.map_items.c
        item_forward = and_(m.status == RUNNING, c.status.in_(CHILD_ENDED))
        item_backward = and_(m.status == SUCCEEDED, s.status == StepStatus.COMPENSATING.value,
                             r.status == RunStatus.COMPENSATING.value, c.status.in_(CHILD_UNDONE))

        def read(conn) -> list[str]:
            found = list(conn.execute(
                select(c.id)
                .select_from(t.steps.join(t.runs, r.id == s.run_id).join(child, c.id == s.child_run_id))
                # Driven from the parent's status (indexed): only waiting and compensating runs are read.
                .where(r.status.in_(CHILD_PARENT), s.kind == "child", or_(forward, backward), quiet)
                .order_by(c.updated_at).limit(limit)
            ).scalars().all())
            # From the live runs' map steps to their children (ix_saga_runs_parent), then each child's item
            # by its key: an action map's items are never read.
            found += conn.execute(
                select(c.id)
                .select_from(t.runs.join(t.steps, s.run_id == r.id)
                             .join(child, and_(c.parent_run_id == r.id, c.parent_step == s.idx))
                             .join(t.map_items, and_(m.run_id == r.id, m.idx == s.idx, m.item == c.parent_item)))
                .where(r.status.in_((RunStatus.RUNNING.value, RunStatus.COMPENSATING.value)), s.kind == "map",
                       s.status.in_((StepStatus.RUNNING.value, StepStatus.COMPENSATING.value)),
                       c.parent_item.is_not(None), m.child_run_id == c.id, or_(item_forward, item_backward), quiet)
                .order_by(c.updated_at).limit(limit)
            ).scalars().all()
            return found

        return list(self._read(read))  # read inside the connection: once it is back in the pool, another thread uses it
