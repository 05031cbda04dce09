"""Telling a person that a run needs them: a run that ends in ``compensation_failed`` could not be undone,
and a run ``stuck`` after its pivot could not go forward; each waits for an operator (``sagaflow retry
<run_id>`` once the cause is fixed).

Two channels: an ERROR log record ``run_compensation_failed`` that an operator can grep or route, and the
optional SAGAFLOW_ALERT_HOOK, ``"module:callable"``, called with the Run (pager, chat, ticket...).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

from sagaflow.errors import SagaflowError
from sagaflow.model import Run

log = logging.getLogger("sagaflow.alerts")


def load_hook(spec: str) -> Callable[[Run], object] | None:
    """The callable named by ``"module:callable"``; None for an empty spec."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SagaflowError(f"SAGAFLOW_ALERT_HOOK={spec!r} must look like 'package.module:function'")
    try:
        hook = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SagaflowError(f"SAGAFLOW_ALERT_HOOK={spec!r} cannot be loaded: {exc}") from None
    if not callable(hook):
        raise SagaflowError(f"SAGAFLOW_ALERT_HOOK={spec!r} is not callable")
    return hook


def compensation_failed(run: Run, hook_spec: str) -> None:
    """An undo failed for good: the run is ``compensation_failed`` and waits for an operator."""
    _alert("run_compensation_failed", run, "compensation_failed", hook_spec)


def run_stuck(run: Run, hook_spec: str) -> None:
    """A step after the pivot failed for good: the run is ``stuck`` (it can no longer be undone) and waits
    for an operator to fix the cause and send it forward again."""
    _alert("run_stuck", run, "failed", hook_spec)


def _alert(event: str, run: Run, step_status: str, hook_spec: str) -> None:
    """Log the alert record, then call the hook; a failing hook is logged, never raised: the run's state
    is already recorded and the log record already says what to do."""
    failed = next((s.name for s in run.steps if s.status == step_status), None)
    log.error(event, extra={
        "run_id": run.id, "saga": run.saga, "step": failed, "error": run.error,
        "next": f"fix the cause, then run `sagaflow retry {run.id}`",
    })
    try:
        hook = load_hook(hook_spec)
        if hook is not None:
            hook(run)
    except Exception as exc:  # noqa: BLE001 - an alert channel's failure must not touch the run
        log.error("alert_hook_failed", extra={"run_id": run.id, "hook": hook_spec,
                                              "error": f"{type(exc).__name__}: {exc}"})
