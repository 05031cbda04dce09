"""State of runs, steps and events in SQL: tables, guarded transitions and migrations. The values it takes
and returns (statuses, snapshots, outcomes, event kinds) are the model's (sagaflow/model/)."""

from sagaflow.store.repository import Store

__all__ = ["Store"]
