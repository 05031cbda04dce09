"""The base classes of sagaflow's Celery tasks: GuardedTask (every task's messages pass a depth check),
GenericTask (the errbacks, finish, the sweeper) and SagaTask (one per step and per compensation)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable

from celery import Task
from celery.exceptions import Ignore
from celery.signals import worker_init

from sagaflow import inbound
from sagaflow.app import get_settings, get_store
from sagaflow.errors import LeaseLost, NonRetryableError, SagaCancelled
from sagaflow.model import clock
from sagaflow.model.definition import RetryPolicy, Saga, Step, StepKind, registry
from sagaflow.runtime.compiler import HARD_LIMIT_GRACE
from sagaflow.runtime.outcomes import DB_OUTAGE, DB_RETRY, LEASE_MARGIN, FailedForGood, describe, traceback_text

log = logging.getLogger("sagaflow.runtime")


class GuardedTask(Task):
    """Base of every sagaflow task: its messages pass a depth check in the worker's main process before they
    are decoded and pickled for the pool (sagaflow/inbound.py)."""

    abstract = True
    Strategy = "sagaflow.inbound:strategy"

    def retry(self, *args, countdown=None, **kwargs):
        # Quorum queues (SAGAFLOW_RABBITMQ_QUORUM): a countdown goes through RabbitMQ's native delayed
        # delivery, which counts whole seconds, and Celery refuses a countdown between 0 and 1 s there.
        if countdown is not None and 0 < countdown < 1 and get_settings().rabbitmq_quorum:
            countdown = 1.0
        if countdown is not None:  # the wall clock's own delay; sagaflow.testing's clock skips it (model/clock.py)
            countdown = clock.countdown(countdown)
        return super().retry(*args, countdown=countdown, **kwargs)


class GenericTask(GuardedTask):
    """Base of the generic tasks (errbacks, finish, the sweeper): a refused message is dropped, logged."""

    abstract = True

    def before_start(self, task_id, args, kwargs):
        reason = inbound.refused(self.request)
        if reason is not None:
            run_id = kwargs.get("run_id") if isinstance(kwargs, dict) else None
            if run_id is None and args and isinstance(args[0], str):
                run_id = args[0]
            log.error("message_dropped", extra={"task": self.name, "task_id": task_id, "run_id": run_id,
                                                "reason": reason})
            raise Ignore()


@worker_init.connect
def _guard_transport(**_):
    inbound.guard_redis_transport(inbound.message_depth_limit(get_settings().json_max_depth))


GENERIC_TASK = dict(base=GenericTask, bind=True, acks_late=True, ignore_result=True, autoretry_for=DB_OUTAGE,
                    retry_backoff=True, retry_backoff_max=30, max_retries=DB_RETRY.max_attempts)


def lease_seconds(step: Step) -> float:
    """How long a claim counts as alive without a heartbeat: past the hard time limit by a margin, so a
    step killed at its limit is handled by its errback, not by the recovery sweeper."""
    if step.lease:
        return step.lease
    timeout = step.timeout if step.kind is not StepKind.GATE else None  # a gate's is its deadline
    return (timeout or get_settings().default_step_timeout) + HARD_LIMIT_GRACE + LEASE_MARGIN


class SagaTask(GuardedTask):
    """Base of the per-saga tasks. The saga and step are bound when the task is declared."""

    abstract = True
    acks_late = True
    ignore_result = True
    # Bounds retries after a pool child is lost (task_retry_on_worker_lost); the step's RetryPolicy
    # governs ordinary retries.
    max_retries = 10
    default_retry_delay = 1  # that retry's countdown; Celery's default of 180 s would stall the run
    # Expected outcomes: recorded in SQL and logged by us, no traceback in the worker log.
    throws = (SagaCancelled, NonRetryableError)
    saga_name: str = ""
    step_name: str = ""

    def definition(self, version: int) -> tuple[Saga, Step]:
        saga = registry.get(self.saga_name, version)
        return saga, next(s for s in saga.steps if s.name == self.step_name)

    def tokens(self) -> tuple[str, list[str]]:
        """This delivery's claim token, and those of the earlier retries of the same task."""
        retries = self.request.retries or 0
        return f"{self.request.id}:{retries}", [f"{self.request.id}:{k}" for k in range(retries)]

    @contextmanager
    def database_outage_retries(self):
        """The state store was unreachable: deliver the whole task again later. An outage is not the
        step's failure and must not compensate the run. The claim token makes the redelivery safe."""
        try:
            yield
        except DB_OUTAGE as exc:
            retries = self.request.retries or 0
            delay = DB_RETRY.delay(retries + 1)
            log.warning("database_unreachable",
                        extra={"task": self.name, "retry_in": round(delay, 3), "error": describe(exc)})
            raise self.retry(exc=exc, countdown=delay, max_retries=DB_RETRY.max_attempts) from exc

    def retry_or_give_up(self, exc: Exception, claim, policy: RetryPolicy, phase: str, fields: dict, *,
                         note_retry: Callable[[str, float, str | None], bool],
                         give_up: Callable[[str, str | None], bool],
                         wait: Callable[[float], FailedForGood] | None = None) -> FailedForGood:
        """The action (phase "step") or compensation raised: schedule a retry if the policy allows, else
        record the failure. The policy counts executions recorded in SQL (per operator-retry round), not
        Celery retries, so a retry after a database outage or a lost process spends none of its budget.
        A delivery that no longer holds the claim records nothing and stops. The error's traceback is
        recorded with the attempt (bounded: outcomes.TRACEBACK_CHARS). ``wait``: how a delay of at least
        SAGAFLOW_DURABLE_RETRY_AFTER seconds waits in SQL instead of the broker (runtime/timers.py: raises
        Ignore, or returns a FailedForGood when a cancel came in)."""
        error = describe(exc, self.soft_limit())
        trace = traceback_text(exc)
        attempt = claim.round_attempt
        if policy.allows_retry(exc, attempt):
            delay = policy.delay(attempt)
            if note_retry(error, delay, trace):
                log.info(f"{phase}_retried", extra={**fields, "attempt": attempt, "retry_in": round(delay, 3)})
                if wait is not None and delay >= get_settings().durable_retry_after:
                    return wait(delay)
                raise self.retry(exc=exc, countdown=delay, max_retries=self.request.retries + 1)
            raise Ignore()
        if give_up(error, trace):
            log.warning(f"{phase}_failed", extra={**fields, "attempt": claim.attempt, "error": error})
            return FailedForGood(exc)
        raise Ignore()

    def soft_limit(self) -> float | None:
        """This delivery's soft time limit (seconds): the message's, else the task's."""
        limits = getattr(self.request, "timelimit", None) or (None, None)
        return limits[1] or self.soft_time_limit

    def lease_seconds(self, step: Step) -> float:
        return lease_seconds(step)

    def heartbeat(self, run_id: str, index: int, token: str, lease: float, stop_on_cancel: bool):
        def beat() -> None:
            try:
                held, cancel = get_store().extend_lease(run_id, index, token, lease)
            except DB_OUTAGE as exc:  # a missed beat is not fatal: the lease has some time left
                log.warning("heartbeat_not_recorded", extra={"run_id": run_id, "error": describe(exc)})
                return
            if not held:
                raise LeaseLost(f"run {run_id}: another delivery took over step {index} after its lease expired")
            if cancel and stop_on_cancel:
                raise SagaCancelled(f"run {run_id} was cancelled while the step ran")

        return beat
