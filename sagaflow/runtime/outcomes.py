"""Small shared pieces of the runtime: what a failure that is recorded looks like (FailedForGood), the errors
recorded for lost processes, and how the runtime treats a database outage. Imports nothing of the runtime."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import InterfaceError, OperationalError

from sagaflow.errors import SagaCancelled
from sagaflow.model.definition import RetryPolicy

LOST_STEP = ("the step's worker process was lost or hit its hard time limit before it could record an error; "
             "check the worker's log")
LOST_COMPENSATION = ("the compensation's worker process was lost or hit its hard time limit; check the worker's "
                     "log, fix the cause, then `sagaflow retry <run_id>`")
LOST_PLAIN = ("a step of this plain run (compensation off by policy) failed, and its worker was lost or could not "
              "record the error; check the worker's log")

LEASE_MARGIN = 2.0  # seconds a lease outlives the hard time limit

# Connection lost, server restarting, connections terminated: worth trying again, for about 25 minutes.
DB_OUTAGE = (OperationalError, InterfaceError)
DB_RETRY = RetryPolicy(max_attempts=50, initial_interval=0.5, backoff=2.0, max_interval=30.0)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class FailedForGood:
    """The action (or compensation) failed and the failure is recorded: raise it to fire the errback.
    Raised outside the outage handler, so an action's own database error is never mistaken for ours."""

    exc: Exception


def cancelled(run_id: str, what: str) -> FailedForGood:
    """A cancel came in: fail into the errback, which compensates."""
    return FailedForGood(SagaCancelled(f"run {run_id} was cancelled {what}"))
