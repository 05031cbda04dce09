"""Map steps: one row per item of the list a map step computed (saga_map_items), the window of items in
flight, and the map's end (success with the results in item order, or failure once nothing is in flight).

Every decision about a map (hand out the next items, complete the step, fail it) is made with the run row
locked (guards.lock_run), in the transaction that records the item's own transition, so two items that end
at the same time decide one after the other, each seeing what the other committed. The window refills there:
each item that ends hands out as many pending items as the map's concurrency leaves free.

The map step's own row stays ``running`` while its items run. Its lease is pushed forward by every item's
transition: if no item moves for a whole lease (their workers died, a message was lost), the recovery
sweeper takes the step back and resumes the run at the map step, whose new delivery (start_map) re-drives
the items whose lease ran out and re-publishes those handed out but never claimed.

A map fails only when nothing of it is in flight any more: an item that fails for good (or a cancel) stops
the window, the items handed out but not yet run are skipped when their message arrives, and the items
running then finish (a late success is recorded, so the map's undo undoes it too). The last one to end
records the map step failed, and its errback compensates: the map's undo (a failed map step counts as
non-atomic: StepSpec.of) undoes every completed item, then the earlier steps are undone as usual.

Every query is bounded by the index (run, step, status, item): the cost of an item's end does not grow with
the length of the list.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from sqlalchemy import and_, func, insert, or_, select, update

from sagaflow.model.events import EventKind
from sagaflow.model.outcomes import ClaimOutcome, ItemClaim, MapOutcome
from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import tables as t
from sagaflow.store.engine import Engines, utcnow
from sagaflow.store.guards import LIVE_RUN, event, fail_step, lock_run, move_step, results, succeed_run

PENDING, DISPATCHED, RUNNING, SUCCEEDED, FAILED, SKIPPED, COMPENSATED = (
    "pending", "dispatched", "running", "succeeded", "failed", "skipped", "compensated")
ITEM_STATUSES = (PENDING, DISPATCHED, RUNNING, SUCCEEDED, FAILED, SKIPPED, COMPENSATED)
IN_FLIGHT = (DISPATCHED, RUNNING)
INSERT_BATCH = 1000  # rows per INSERT of a new map's items
CANCELLED_MAP = "the run was cancelled while the map ran"
LEASE_PUSH_EVERY = dt.timedelta(seconds=1)


def _item(run_id: str, idx: int):
    m = t.map_items.c
    return and_(m.run_id == run_id, m.idx == idx)


def item_row(run_id: str, idx: int, item: int):
    """The row of one item (its primary key)."""
    return and_(_item(run_id, idx), t.map_items.c.item == item)


def _first(conn, run_id: str, idx: int, statuses: Sequence[str]):
    m = t.map_items.c
    return conn.execute(select(m.item, m.error).where(_item(run_id, idx), m.status.in_(list(statuses)))
                        .order_by(m.item).limit(1)).first()


def reopen_items(conn, run_id: str, indexes: Sequence[int]) -> None:
    """An operator's forward retry put the failed steps ``indexes`` back to pending (a run stuck past its
    pivot, store/flags.py): their map items that failed or were skipped go back to pending too, so the map's
    next delivery runs them again (their retry policy starts a new round: attempts from 1); the completed
    ones stay done."""
    m = t.map_items.c
    if indexes:
        conn.execute(update(t.map_items)
                     .where(m.run_id == run_id, m.idx.in_(list(indexes)), m.status.in_([FAILED, SKIPPED]))
                     .values(status=PENDING, claim=None, lease_expires_at=None, finished_at=None, attempts=0))


class Maps(Engines):
    def map_has_items(self, run_id: str, idx: int) -> bool:
        """Whether the map step ``idx`` computed its items already (a re-driven map reuses them)."""
        return self._read(lambda conn: _first(conn, run_id, idx, ITEM_STATUSES) is not None)

    def start_map(self, run_id: str, idx: int, token: str, items: list | None, concurrency: int,
                  lease: float) -> MapOutcome | None:
        """The map step's delivery holds the step (claimed by ``token``): record ``items`` (once: None when
        they are recorded already), hand out the first window, and re-drive the items of an earlier delivery
        that were lost (handed out but never claimed, or running past their lease). The step's row then
        names no worker: its items run on many. None when this delivery no longer holds the step."""
        now = utcnow()
        m = t.map_items.c
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            step = move_step(conn, run_id, idx, StepStatus.RUNNING, token=token, worker=None,
                             lease_expires_at=now + dt.timedelta(seconds=lease))
            if run is None or step is None:
                return None
            if items is not None and _first(conn, run_id, idx, ITEM_STATUSES) is None:
                rows = [dict(run_id=run_id, idx=idx, item=n, status=PENDING, value=value, attempts=0)
                        for n, value in enumerate(items)]
                for start in range(0, len(rows), INSERT_BATCH):
                    conn.execute(insert(t.map_items), rows[start:start + INSERT_BATCH])
                event(conn, run_id, EventKind.MAP_STARTED, step.name,
                      {"items": len(rows), "concurrency": concurrency}, now)
            lost = conn.execute(
                update(t.map_items)
                .where(_item(run_id, idx), or_(m.status == DISPATCHED,
                                               and_(m.status == RUNNING, m.lease_expires_at < now)))
                .values(status=DISPATCHED, claim=None, lease_expires_at=None, dispatched_at=now)
                .returning(m.item)
            ).all()
            return self._advance(conn, run, run_id, idx, step.name, concurrency, lease, now,
                                 again=tuple(sorted(r.item for r in lost)))

    def claim_item(self, run_id: str, idx: int, item: int, token: str, earlier_tokens: Sequence[str],
                   lease: float, concurrency: int) -> ItemClaim:
        """An item's delivery claims it (compare-and-set, as a step's claim: store/guards.claimable). When the
        map is failing (an item failed for good, a cancel came in) an item not yet run is skipped instead,
        and its end may end the map (``after``).

        The claim itself takes no run lock: an item handed out counts as in flight whether it is claimed or
        not, so a failure decided meanwhile (under the lock) waits for it either way. Only the skip, which
        may end the map, is decided under the lock."""
        now = utcnow()
        m, r, s = t.map_items.c, t.runs.c, t.steps.c
        options = [m.status == DISPATCHED,
                   and_(m.status == RUNNING, m.claim == token, m.lease_expires_at < now),
                   and_(m.status == RUNNING, m.claim.is_(None))]
        if earlier_tokens:
            options.append(and_(m.status == RUNNING, m.claim.in_(list(earlier_tokens))))
        mine = and_(_item(run_id, idx), m.item == item, or_(*options))
        for locked in (False, True):
            with self.engine.begin() as conn:
                run = (lock_run(conn, run_id, r.input) if locked else
                       conn.execute(select(r.status, r.cancel_requested, r.input).where(r.id == run_id)).first())
                row = conn.execute(select(m.status, m.value).where(_item(run_id, idx), m.item == item)).first()
                step = conn.execute(select(s.name, s.status).where(s.run_id == run_id, s.idx == idx)).first()
                if run is None or row is None or step is None:
                    return ItemClaim(ClaimOutcome.GONE)
                if row.status in (SUCCEEDED, COMPENSATED):
                    return ItemClaim(ClaimOutcome.DONE)
                if row.status in (FAILED, SKIPPED, PENDING):
                    return ItemClaim(ClaimOutcome.GONE)
                if step.status == StepStatus.RUNNING.value and not self._failing(conn, run, run_id, idx):
                    claimed = conn.execute(
                        update(t.map_items).where(mine)
                        .values(status=RUNNING, claim=token, attempts=m.attempts + 1,
                                lease_expires_at=now + dt.timedelta(seconds=lease))
                        .returning(m.attempts)
                    ).first()
                    if claimed is None:
                        return ItemClaim(ClaimOutcome.BUSY)
                    self._push_lease(conn, run_id, idx, now, lease)
                    return ItemClaim(ClaimOutcome.CLAIMED, value=row.value, attempt=claimed.attempts,
                                     input=run.input)
                if not locked:
                    continue  # the map is failing: decide the skip under the run lock
                skipped = conn.execute(update(t.map_items).where(mine)
                                       .values(status=SKIPPED, claim=None, lease_expires_at=None, finished_at=now)
                                       .returning(m.item)).first()
                if skipped is None:
                    return ItemClaim(ClaimOutcome.BUSY)
                after = (self._advance(conn, run, run_id, idx, step.name, concurrency, lease, now)
                         if step.status == StepStatus.RUNNING.value else MapOutcome("gone"))
                return ItemClaim(ClaimOutcome.GONE, after=after)
        raise AssertionError("unreachable: the locked pass always decides")

    def retry_item(self, run_id: str, idx: int, item: int, token: str, error: str, delay: float,
                   lease: float) -> bool:
        """The item's attempt failed and will be tried again after ``delay``: keep it (and its map) held
        through the wait. False when this delivery no longer holds it."""
        now = utcnow()
        until = now + dt.timedelta(seconds=delay + lease)
        m = t.map_items.c
        with self.engine.begin() as conn:
            held = conn.execute(update(t.map_items)
                                .where(_item(run_id, idx), m.item == item, m.status == RUNNING, m.claim == token)
                                .values(error=error, lease_expires_at=until).returning(m.item)).first()
            if held is not None:
                self._push_lease(conn, run_id, idx, now, delay + lease)
            return held is not None

    def extend_item_lease(self, run_id: str, idx: int, item: int, token: str, lease: float) -> tuple[bool, bool]:
        """A long item's heartbeat: push its lease (and its map's) forward. (still held, cancel requested)."""
        now = utcnow()
        m, r = t.map_items.c, t.runs.c
        with self.engine.begin() as conn:
            held = conn.execute(update(t.map_items)
                                .where(_item(run_id, idx), m.item == item, m.status == RUNNING, m.claim == token)
                                .values(lease_expires_at=now + dt.timedelta(seconds=lease))
                                .returning(m.item)).first()
            if held is not None:
                self._push_lease(conn, run_id, idx, now, lease)
            cancel = conn.execute(select(r.cancel_requested).where(r.id == run_id)).scalar()
        return held is not None, bool(cancel)

    def complete_item(self, run_id: str, idx: int, item: int, token: str, result: Any, concurrency: int,
                      lease: float) -> MapOutcome | None:
        """Record the item's result and, in the same transaction, what follows (MapOutcome). None when this
        delivery no longer holds the item."""
        return self._end_item(run_id, idx, item, token, concurrency, lease,
                              dict(status=SUCCEEDED, result=result, error=None))

    def fail_item(self, run_id: str, idx: int, item: int, token: str, error: str, concurrency: int,
                  lease: float) -> MapOutcome | None:
        """Record the item's failure for good: the map stops handing out items and fails once none is in
        flight (MapOutcome "failed": fire the map step's errback)."""
        return self._end_item(run_id, idx, item, token, concurrency, lease, dict(status=FAILED, error=error))

    def _end_item(self, run_id: str, idx: int, item: int, token: str, concurrency: int, lease: float,
                  values: dict) -> MapOutcome | None:
        now = utcnow()
        m, s = t.map_items.c, t.steps.c
        with self.engine.begin() as conn:
            run = lock_run(conn, run_id)
            if run is None:
                return None
            ended = conn.execute(
                update(t.map_items)
                .where(_item(run_id, idx), m.item == item, m.status == RUNNING, m.claim == token)
                .values(lease_expires_at=None, finished_at=now, **values).returning(m.item)
            ).first()
            if ended is None:
                return None
            step = conn.execute(select(s.name, s.status).where(s.run_id == run_id, s.idx == idx)).first()
            if step is None:
                return None
            if values["status"] == FAILED:
                event(conn, run_id, EventKind.MAP_ITEM_FAILED, step.name, {"item": item, "error": values["error"]},
                      now)
            if step.status != StepStatus.RUNNING.value:
                return MapOutcome("gone")
            return self._advance(conn, run, run_id, idx, step.name, concurrency, lease, now)

    def _failing(self, conn, run, run_id: str, idx: int) -> bool:
        return (run.cancel_requested or run.status not in LIVE_RUN
                or _first(conn, run_id, idx, (FAILED,)) is not None)

    def _push_lease(self, conn, run_id: str, idx: int, now: dt.datetime, seconds: float) -> None:
        """An item moved: the map is alive for another lease (never shortened). Written at most once a second
        (LEASE_PUSH_EVERY): every item's transition would otherwise queue on the map step's row."""
        s = t.steps.c
        until = now + dt.timedelta(seconds=seconds)
        conn.execute(update(t.steps)
                     .where(s.run_id == run_id, s.idx == idx, s.status == StepStatus.RUNNING.value,
                            or_(s.lease_expires_at.is_(None), s.lease_expires_at < until - LEASE_PUSH_EVERY))
                     .values(lease_expires_at=until))

    def _advance(self, conn, run, run_id: str, idx: int, name: str, concurrency: int, lease: float,
                 now: dt.datetime, again: tuple[int, ...] = ()) -> MapOutcome:
        """Under the run lock, the map step ``idx`` still running: refill the window, or end the map.
        ``again``: items re-driven by this caller (publish them too)."""
        m, s = t.map_items.c, t.steps.c
        in_flight = conn.execute(select(func.count()).select_from(t.map_items)
                                 .where(_item(run_id, idx), m.status.in_(IN_FLIGHT))).scalar_one()
        if self._failing(conn, run, run_id, idx):
            if in_flight:
                return MapOutcome("dispatch", items=again) if again else MapOutcome("waiting")
            conn.execute(update(t.map_items).where(_item(run_id, idx), m.status == PENDING)
                         .values(status=SKIPPED, finished_at=now))
            failed = _first(conn, run_id, idx, (FAILED,))
            error = (f"item {failed.item} failed: {failed.error}" if failed is not None else CANCELLED_MAP)
            if fail_step(conn, run_id, idx, StepStatus.RUNNING, error, now,
                         detail={"item": failed.item} if failed is not None else {}) is None:
                return MapOutcome("gone")
            return MapOutcome("failed")
        free = concurrency - in_flight
        handed: list[int] = []
        if free > 0:
            handed = [r.item for r in conn.execute(
                select(m.item).where(_item(run_id, idx), m.status == PENDING).order_by(m.item).limit(free)).all()]
            if handed:
                conn.execute(update(t.map_items).where(_item(run_id, idx), m.item.in_(handed))
                             .values(status=DISPATCHED, dispatched_at=now))
        self._push_lease(conn, run_id, idx, now, lease)
        if handed or again:
            return MapOutcome("dispatch", items=tuple(sorted({*again, *handed})))
        if in_flight:
            return MapOutcome("waiting")
        # Nothing pending, nothing in flight, nothing failed: every item succeeded.
        value = [r.result for r in conn.execute(select(m.result).where(_item(run_id, idx)).order_by(m.item))]
        if move_step(conn, run_id, idx, StepStatus.RUNNING, status=StepStatus.SUCCEEDED.value, result=value,
                     error=None, finished_at=now, lease_expires_at=None) is None:
            return MapOutcome("gone")
        event(conn, run_id, EventKind.STEP_SUCCEEDED, name, {"items": len(value)}, now)
        total = conn.execute(select(func.count()).select_from(t.steps).where(s.run_id == run_id)).scalar_one()
        if idx + 1 < total:
            return MapOutcome("done", next_index=idx + 1, results=results(conn, run_id))
        if run.status == RunStatus.RUNNING.value:
            succeed_run(conn, run_id, now)
        return MapOutcome("finished")

    # ------------------------------------------------------------------------------------------ the undo

    def items_to_undo(self, run_id: str, idx: int) -> list[tuple[int, Any, Any]]:
        """(item, value, result) of the map's completed items not yet undone, latest completed first."""
        m = t.map_items.c
        rows = self._read(lambda conn: conn.execute(
            select(m.item, m.value, m.result).where(_item(run_id, idx), m.status == SUCCEEDED)
            .order_by(m.finished_at.desc(), m.item.desc())).all())
        return [(r.item, r.value, r.result) for r in rows]

    def item_undone(self, run_id: str, idx: int, item: int) -> bool:
        """Record an item's undo (once: False when it was recorded already)."""
        m = t.map_items.c
        with self.engine.begin() as conn:
            return conn.execute(update(t.map_items)
                                .where(_item(run_id, idx), m.item == item, m.status == SUCCEEDED)
                                .values(status=COMPENSATED).returning(m.item)).first() is not None

    # ------------------------------------------------------------------------------------------ for the page

    def map_summary(self, run_id: str, limit: int = 100) -> dict[int, dict]:
        """For each map step of the run: its items' counts by status and the first ``limit`` items (item,
        status, attempts, error), by step index. Empty for a run without map steps."""
        m = t.map_items.c

        def read(conn) -> dict[int, dict]:
            found: dict[int, dict] = {}
            for row in conn.execute(select(m.idx, m.status, func.count().label("n")).where(m.run_id == run_id)
                                    .group_by(m.idx, m.status)).all():
                entry = found.setdefault(row.idx, {"counts": {}, "items": [], "total": 0})
                entry["counts"][row.status] = row.n
                entry["total"] += row.n
            for idx, entry in found.items():
                entry["items"] = [dict(item=r.item, status=r.status, attempts=r.attempts, error=r.error)
                                  for r in conn.execute(select(m.item, m.status, m.attempts, m.error)
                                                        .where(_item(run_id, idx)).order_by(m.item).limit(limit))]
            return found

        return self._read(read)
