"""Undo the recording of a run that was never published: ``SagaClient.start`` when the broker refuses the first
message. A refused start must leave nothing behind (no ``pending`` run that nothing will ever move)."""

from __future__ import annotations

from sqlalchemy import delete, select

from sagaflow.model.status import RunStatus, StepStatus
from sagaflow.store import counters
from sagaflow.store import tables as t


def discard_unpublished_run(store, run_id: str) -> bool:
    """Delete the run, its steps, events and signals in one transaction, if it is still exactly as ``start`` left
    it: ``pending``, no step begun. True when deleted. A just-created run whose first message was never published
    cannot have been touched by anything else (the recovery sweeper re-drives only after
    SAGAFLOW_STALL_TIMEOUT); the guard keeps it that way if it somehow was."""
    with store.engine.begin() as conn:
        found = conn.execute(select(t.runs.c.status, t.runs.c.saga).where(t.runs.c.id == run_id)
                             .with_for_update()).first()
        if found is None or found.status != RunStatus.PENDING.value:
            return False
        begun = conn.execute(
            select(t.steps.c.idx).where(t.steps.c.run_id == run_id, t.steps.c.status != StepStatus.PENDING.value)
            .limit(1)
        ).first()
        if begun is not None:
            return False
        for table in (t.signals, t.events, t.steps):
            conn.execute(delete(table).where(table.c.run_id == run_id))
        deleted = conn.execute(
            delete(t.runs).where(t.runs.c.id == run_id, t.runs.c.status == RunStatus.PENDING.value)
        ).rowcount
        if deleted == 1:  # never published: it takes back what its creation counted (started, pending)
            counters.log(conn, [counters.row(counters.STARTED, found.saga, "", -1),
                                counters.row(counters.LIVE, found.saga, RunStatus.PENDING.value, -1)])
    return deleted == 1
