"""Kept for the runtime until it imports sagaflow.model: the snapshots and statuses moved to
sagaflow/model/snapshots.py and sagaflow/model/status.py."""

from sagaflow.model.snapshots import Event, Run, StepSpec, StepState
from sagaflow.model.status import FINAL_RUN_STATUSES, RunStatus, StepStatus

__all__ = ["Event", "FINAL_RUN_STATUSES", "Run", "RunStatus", "StepSpec", "StepState", "StepStatus"]
