"""Recovery: which runs stalled (their holder died, or a message was lost), taking one over (one sweeper
wins), and deciding from SQL what to publish to move it on (``Recovery``)."""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from sqlalchemy import and_, exists, or_, select, update

from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import Recovery
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.groups import settle_lost_branches
from sagaflow.store.guards import DONE_STEP, HELD_STEP, IN_PROGRESS_RUN, event
from sagaflow.store.workers import claim_alive, worker_dead


def stalled(now: dt.datetime, stall_timeout: float, dead_after: float | None = None):
    """Run is in progress, no step holds a live claim, and either a holder's claim died (its lease
    expired, or the worker it names stopped heartbeating for dead_after seconds: store/workers.py) or
    nothing moved for stall_timeout seconds (a message was lost: broker restart, a crash before publish,
    a start whose publish failed). A step's success moves no run column (one row write less on the hot
    path), so "moved" is the run's updated_at or its latest step's finished_at."""
    r, s = t.runs.c, t.steps.c
    held = (s.run_id == r.id) & s.status.in_(HELD_STEP)
    alive = claim_alive(now, dead_after)
    quiet_since = now - dt.timedelta(seconds=stall_timeout)
    return and_(
        r.status.in_(IN_PROGRESS_RUN),
        ~child_branch_waits(r),
        ~map_children_wait(r),
        r.mode == "saga",  # a plain run (policy) has no steps to re-drive: plain Celery semantics
        # a step waiting in a limit's line is moved by the slot it waits for (store/limits.py), not re-driven
        ~exists().where(s.run_id == r.id, s.status == StepStatus.QUEUED.value),
        ~exists().where(held, alive),
        or_(exists().where(held, ~alive),
            and_(r.updated_at < quiet_since,
                 ~exists().where(s.run_id == r.id, s.finished_at >= quiet_since))),
    )


def child_branch_waits(r):
    """A child branch of a parallel group waits for its child run and nothing else of the group is left
    to deliver or held: the run is quiet on purpose (the child's end moves it; unreported_children re-sends
    a lost one), like a run at a child step, which is ``waiting``. A sibling still pending or held, or failed
    in a run still running, keeps the ordinary rules, so a lost sibling message or errback is re-driven."""
    s, other = t.steps.alias("waiting_branch").c, t.steps.alias("sibling").c
    return exists().where(
        s.run_id == r.id, s.status == StepStatus.WAITING.value, s.branch_group.is_not(None),
        ~exists().where(other.run_id == r.id, other.branch_group == s.branch_group,
                        or_(other.status.in_((StepStatus.PENDING.value, *HELD_STEP)),
                            # a sibling failed while the run still runs: its errback was lost
                            and_(other.status == StepStatus.FAILED.value, r.status != RunStatus.COMPENSATING.value))))


def map_children_wait(r):
    """A running map of child runs whose items in flight all wait for their child runs (none handed out
    unclaimed, none running an action): the run is quiet on purpose, however long the children take; each
    child's end moves its item (unreported_children re-sends a lost one). Anything else of the map in flight
    keeps the ordinary rules, so a lost item message is re-driven through the map's lease."""
    s, m, other = t.steps.alias("map_step").c, t.map_items.alias("waiting_item").c, t.map_items.alias("other_item").c
    return exists().where(
        s.run_id == r.id, s.kind == "map", s.status == StepStatus.RUNNING.value,
        exists().where(m.run_id == r.id, m.idx == s.idx, m.status == "running", m.child_run_id.is_not(None)),
        ~exists().where(other.run_id == r.id, other.idx == s.idx,
                        or_(other.status == "dispatched",
                            and_(other.status == "running", other.child_run_id.is_(None)))))


def recovery_plan(run_id: str, run, steps, revoked: tuple[str, ...]) -> Recovery:
    base = dict(run_id=run_id, saga=run.saga, version=run.saga_version, revoked=revoked)
    if run.status == RunStatus.COMPENSATING.value:
        # An undo that gave up is recorded, but its errback (which ends the run compensation_failed) was lost:
        # publish that errback again. Never the earlier undos: the compensation stops at the one that failed.
        failed = [st.idx for st in steps if st.status == StepStatus.COMPENSATION_FAILED.value]
        if failed:
            return Recovery(action="compensation_errback", index=failed[-1], **base)
        todo = [st.idx for st in reversed(steps) if st.has_compensation
                and (st.status in (StepStatus.SUCCEEDED.value, StepStatus.COMPENSATING.value)
                     or (st.non_atomic and st.status == StepStatus.FAILED.value))]
        # A late child branch still waits for its child: the steps before its group are undone after it.
        late = [st.branch_group for st in steps
                if st.status == StepStatus.WAITING.value and st.branch_group is not None]
        if late:
            todo = [i for i in todo if i >= min(late)]
        return Recovery(action="compensate", indexes=tuple(todo), **base)
    # A best-effort step that failed counts as done: the run went on without its result.
    frontier = next((st for st in steps if st.status not in DONE_STEP), None)
    results = {st.name: st.result for st in steps
               if st.status in (StepStatus.SUCCEEDED.value, StepStatus.FAILED_BEST_EFFORT.value)}
    if frontier is None:
        return Recovery(action="finish", index=len(steps), results=results, **base)
    if frontier.status == StepStatus.FAILED.value:
        return Recovery(action="errback", index=frontier.idx, **base)
    if frontier.status == StepStatus.WAITING.value:  # a gate or child step: its signal or child moves it
        group = [st for st in steps if frontier.branch_group is not None and st.branch_group == frontier.branch_group]
        sibling = next((st for st in group if st.status == StepStatus.FAILED.value), None)
        if sibling is not None:  # a child branch waits, but a sibling failed and its errback was lost
            return Recovery(action="errback", index=sibling.idx, **base)
        if all(st.status in (*DONE_STEP, StepStatus.WAITING.value) for st in group):
            return Recovery(action="wait", index=frontier.idx, **base)
        # a child branch waits, but a sibling's message was lost: publish the group again (claims turn the
        # messages of the branches that are done, running or waiting into duplicates)
    return Recovery(action="resume", index=frontier.idx, results=results, **base)


class Recoveries(Engines):
    def stalled_runs(self, stall_timeout: float, limit: int = 500, dead_after: float | None = None,
                     sagas: Sequence[str] | None = None) -> list[tuple[str, dt.datetime]]:
        """(run id, updated_at) of the stalled runs, longest stalled first. ``dead_after``: a claim whose
        worker has not heartbeated for that many seconds is dead whatever its lease (None: leases only).
        ``sagas``: only runs of these sagas (a sweeper re-drives only what it can compile; None: all)."""
        r = t.runs.c
        only = [r.saga.in_(list(sagas))] if sagas is not None else []
        rows = self._read(lambda conn: conn.execute(
            select(r.id, r.updated_at).where(stalled(utcnow(), stall_timeout, dead_after), *only)
            .order_by(r.updated_at).limit(limit)
        ).all())
        return [(row.id, row.updated_at) for row in rows]

    def take_over_stalled(self, run_id: str, seen_updated_at: dt.datetime, stall_timeout: float,
                          dead_after: float | None = None) -> Recovery | None:
        """Claim the re-drive of a stalled run (compare-and-set on updated_at, so of two sweepers one
        wins, and a run that moved meanwhile is left alone), take back expired claims, and decide from
        SQL what to publish. None when this caller did not win."""
        now = utcnow()
        r, s = t.runs.c, t.steps.c
        with self.engine.begin() as conn:
            run = conn.execute(
                update(t.runs)
                .where(r.id == run_id, r.updated_at == seen_updated_at, stalled(now, stall_timeout, dead_after))
                .values(updated_at=now)
                .returning(r.status, r.saga, r.saga_version)
            ).first()
            if run is None:
                return None
            # The holder is gone: any delivery may claim the step now, and the lease no longer counts.
            lost = and_(s.run_id == run_id, s.status.in_(HELD_STEP), ~claim_alive(now, dead_after))
            # Named only when the worker stopped heartbeating, not when a live worker's lease ran out.
            dead_workers = sorted({row.worker for row in conn.execute(
                select(s.worker).where(lost, worker_dead(now, dead_after))).all()})
            revoked = conn.execute(
                update(t.steps).where(lost).values(claim=None, lease_expires_at=None, worker=None)
                .returning(s.name)
            ).all()
            if run.status == RunStatus.COMPENSATING.value:
                settle_lost_branches(conn, run_id, now)
            steps = conn.execute(
                select(s.idx, s.name, s.status, s.result, s.has_compensation, s.non_atomic, s.branch_group)
                .where(s.run_id == run_id).order_by(s.idx)
            ).all()
            recovery = recovery_plan(run_id, run, steps, tuple(r.name for r in revoked))
            event(conn, run_id, EventKind.RUN_RECOVERED, None,
                  {"action": recovery.action, "revoked": list(recovery.revoked),
                   **({"dead_workers": dead_workers} if dead_workers else {}),
                   **({"from_step": steps[recovery.index].name}
                      if recovery.action in ("resume", "errback", "compensation_errback") else {})}, now)
        return recovery
