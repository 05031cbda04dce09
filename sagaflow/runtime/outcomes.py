"""Small shared pieces of the runtime: what a failure that is recorded looks like (FailedForGood), the errors
recorded for lost processes, and how the runtime treats a database outage. Imports nothing of the runtime."""

from __future__ import annotations

import traceback
from dataclasses import dataclass

from billiard.exceptions import SoftTimeLimitExceeded
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


TRACEBACK_CHARS = 8 * 1024  # of a failed attempt's traceback kept in SQL: its last frames


def describe(exc: BaseException, soft_time_limit: float | None = None) -> str:
    """The error text recorded and shown: ``Type: message``; a soft time limit names the limit (Celery's
    exception carries no message)."""
    if isinstance(exc, SoftTimeLimitExceeded) and not exc.args:  # its str() is just "SoftTimeLimitExceeded()"
        limit = f" of {soft_time_limit:g} s" if soft_time_limit else ""
        return (f"{type(exc).__name__}: the step ran past its time limit{limit} (the soft limit: the process is "
                f"killed if it runs on)")
    return f"{type(exc).__name__}: {exc}"


def traceback_text(exc: BaseException, limit: int = TRACEBACK_CHARS) -> str | None:
    """The traceback of ``exc`` as Python prints it (no local variables, so no values beyond the message),
    its last ``limit`` characters: the innermost frames, where the error is, are at the end."""
    if exc.__traceback__ is None:
        return None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    if len(text) > limit:
        text = "... (earlier frames cut)\n" + text[-limit:]
    return text


@dataclass(frozen=True)
class FailedForGood:
    """The action (or compensation) failed and the failure is recorded: raise it to fire the errback.
    Raised outside the outage handler, so an action's own database error is never mistaken for ours."""

    exc: Exception


def cancelled(run_id: str, what: str) -> FailedForGood:
    """A cancel came in: fail into the errback, which compensates."""
    return FailedForGood(SagaCancelled(f"run {run_id} was cancelled {what}"))
