"""SagaClient: start, follow, cancel and retry runs. The Python API, the HTTP API and the CLI all use it.

    client = SagaClient.from_env()
    run = client.start("create_booking", {"customer": "c1"}, idempotency_key="order-17")
    run = client.wait(run.id, timeout=30)
"""

from __future__ import annotations

import builtins
import logging
import time
import uuid
from dataclasses import dataclass

import redis

from sagaflow.app import celery_app, configure, get_settings, get_store, load_sagas
from sagaflow.config.settings import Settings
from sagaflow.errors import BrokerUnavailable, InvalidInput
from sagaflow.model import policy
from sagaflow.model.definition import registry
from sagaflow.model.snapshots import Run, StepSpec
from sagaflow.model.status import RunStatus
from sagaflow.runtime import publish, waits
from sagaflow.safejson import check_text, ensure_json
from sagaflow.store import Store
from sagaflow.store.discard import discard_unpublished_run
from sagaflow.store.stats import Histogram

log = logging.getLogger("sagaflow.client")

MAX_IDEMPOTENCY_KEY = 200
MAX_RUN_ID = 36  # a uuid4 as text


def check_run_id(run_id) -> str:
    """A run id as given by a caller: a short string that can be looked up. Anything else is InvalidInput
    (a NUL or a lone surrogate would fail in the database driver, not as "unknown run")."""
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID:
        raise InvalidInput(f"a run id is a string of 1 to {MAX_RUN_ID} characters, got {run_id!r:.80}")
    return check_text(run_id, "the run id")


class RunList(list):
    """A page of runs (newest first); ``total`` counts every run matching the filters."""

    def __init__(self, runs, total: int) -> None:
        super().__init__(runs)
        self.total = total


@dataclass(frozen=True)
class Metrics:
    """The aggregates /metrics exposes (sagaflow/store/stats.py computes them in SQL)."""

    run_counts: dict[tuple[str, str], int]  # (saga, status) -> runs now
    run_end_counts: dict[tuple[str, str], int]  # (saga, final status) -> runs that ended so
    step_event_counts: dict[tuple[str, str, str], int]  # (saga, step, event kind) -> events
    step_durations: dict[tuple[str, str], Histogram]
    compensation_durations: dict[tuple[str, str], Histogram]


class SagaClient:
    def __init__(self, store: Store | None = None, app=celery_app) -> None:
        self.store = store or get_store()
        self.app = app

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> "SagaClient":
        """Settings from SAGAFLOW_DATABASE_URL, SAGAFLOW_BROKER_URL... (embedded defaults when unset), and the
        sagas they name (SAGAFLOW_IMPORTS, SAGAFLOW_SAGA_FILES), so ``start`` knows declarative sagas too."""
        if settings is not None or get_settings() != Settings.from_env():
            configure(settings)
        load_sagas()
        return cls()

    # ------------------------------------------------------------------ commands

    def start(self, saga: str, input: dict | None = None, *, idempotency_key: str | None = None) -> Run:
        """Record the run and publish its first step; returns at once with the run (status pending).

        With an idempotency key that was used before, returns that earlier run and starts nothing.
        """
        definition = registry.get(saga)  # raises UnknownSaga
        if input is None:
            input = {}
        if not isinstance(input, dict):
            raise InvalidInput(f"input must be a JSON object (a dict), got {type(input).__name__}")
        input = ensure_json(input, "input", get_settings().json_limits)
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY
        ):
            raise InvalidInput(f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} "
                               f"characters")
        if idempotency_key is not None:
            check_text(idempotency_key, "idempotency_key")
        if not definition.steps:
            raise InvalidInput(f"saga {saga!r} has no steps")
        definition.check_runnable()  # DefinitionError: a non-atomic step without a compensation
        # PolicyError: an invalid policy file, or a saga that cannot run plain.
        mode = policy.mode_for(definition, get_settings())
        self._check_broker()
        run, created = self.store.create_run(
            str(uuid.uuid4()), definition.name, definition.version, input,
            [StepSpec.of(s) for s in definition.steps], idempotency_key, mode=mode,
        )
        if created:
            try:
                publish.start(definition, run.id, plain=mode == policy.PLAIN, input=input, app=self.app)
            except Exception as exc:
                raise self._refused_start(run.id, exc) from exc
        return run

    def cancel(self, run_id: str) -> Run:
        """Ask a pending, running or waiting run to stop: it stops before its next step and undoes what
        completed. At a gate, the gate fails and the undoing begins at once; at a child step, the child run
        is cancelled first (it compensates), then this run compensates."""
        return waits.cancel(self.store, check_run_id(run_id))

    def signal(self, run_id: str, name: str, payload=None) -> Run:
        """Deliver signal ``name`` (``payload``: any JSON value, the gate's result) to a run, once. A gate
        waiting for it passes and the run goes on; a signal that arrives before the run reaches its gate is
        kept and taken there. Raises InvalidInput (bad name or payload), UnknownRun, InvalidTransition (the
        run is final, its saga has no gate for ``name``, or the signal was already delivered)."""
        return waits.signal(self.store, check_run_id(run_id), name, payload)

    def retry(self, run_id: str) -> Run:
        """Resume the compensations of a run in ``compensation_failed``, where they stopped; or send a run
        ``stuck`` after its pivot forward again, from the step that failed (earlier results read from SQL)."""
        check_run_id(run_id)
        forward = self.store.request_forward_retry(run_id)  # one transaction: there is no fast variant
        if forward is not None:
            start, results = forward
            run = self.store.get_run(run_id, history=False)
            publish.chain_from(registry.get(run.saga, run.saga_version), run_id, start=start, results=results,
                               app=self.app)
            return self.get(run_id)
        todo = self.store.request_retry(run_id)
        if todo:
            publish.compensations_of(run_id, todo)
        else:  # nothing left to undo: the run ended at once
            publish.run_ended(run_id)
        return self.get(run_id)

    # ------------------------------------------------------------------ queries

    def get(self, run_id: str) -> Run:
        return self.store.get_run(check_run_id(run_id))

    def list(self, status: str | None = None, saga: str | None = None, limit: int = 50, offset: int = 0) -> RunList:
        if status is not None and status not in {s.value for s in RunStatus}:
            raise InvalidInput(f"unknown status {status!r} (one of: {', '.join(s.value for s in RunStatus)})")
        if not (isinstance(limit, int) and 1 <= limit <= 1000) or not (isinstance(offset, int) and offset >= 0):
            raise InvalidInput("limit must be 1..1000 and offset >= 0")
        runs, total = self.store.list_runs(status=status, saga=saga, limit=limit, offset=offset)
        return RunList(runs, total)

    def wait(self, run_id: str, timeout: float = 30.0, poll: float = 0.05) -> Run:
        """Block until the run reaches a final status; raises TimeoutError after ``timeout`` seconds."""
        check_run_id(run_id)
        deadline = time.monotonic() + timeout
        while True:
            run = self.store.get_run(run_id, history=False)
            if run.is_final:
                return self.get(run_id)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {run.status} after {timeout} s")
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)

    # ------------------------------------------------------------------ for the faces (web/, cli.py)
    # What the status page, the HTTP API, the metrics and the CLI read or record besides runs: they hold a
    # client, never the store's engine or SQL.

    def ping(self) -> None:
        """Raise unless the database answers (``SELECT 1``): /healthz."""
        self.store.ping()

    def check_schema(self) -> None:
        """Raise SchemaMissing, saying what to run, unless the database is at the latest migration."""
        self.store.check_schema()

    def schema_revision(self) -> str | None:
        """The database's migration revision (None: no sagaflow tables)."""
        return self.store.schema_revision()

    def run_counts(self, saga: str | None = None) -> dict[tuple[str, str], int]:
        """{(saga, status): runs in that status now}; the model's counts_by_status and compensation_rate
        summarize it."""
        return self.store.run_counts(saga)

    def workers(self) -> builtins.list[dict]:
        """The live workers (heartbeat within SAGAFLOW_WORKER_DEAD_AFTER s), oldest first, each with the steps
        its pool holds: {"id", "hostname", "pid", "queues", "started_at", "heartbeat_at", "age", "holds"}."""
        return self.store.live_workers(get_settings().worker_dead_after)

    def step_duration_percentiles(self) -> dict[tuple[str, str], dict]:
        """{(saga, step): {"count", "max", "p50", "p90", "p99"}} of the steps' durations, in seconds."""
        return self.store.step_duration_percentiles()

    def metrics(self) -> "Metrics":
        """Everything /metrics exposes, read at once (at scrape time: nothing is kept in the process)."""
        return Metrics(self.store.run_counts(), self.store.run_end_counts(), self.store.step_event_counts(),
                       self.store.step_duration_histograms(), self.store.compensation_duration_histograms())

    # The web's operator logins and failed authentications (sagaflow/store/sessions.py), shared by every
    # web process through the database.

    def open_operator_session(self, session_id: str, lifetime: float) -> None:
        self.store.create_session(session_id, lifetime)

    def operator_session_alive(self, session_id: str) -> bool:
        return self.store.session_alive(session_id)

    def close_operator_session(self, session_id: str) -> None:
        self.store.revoke_session(session_id)

    def auth_retry_after(self, address: str, limit: int, window: float) -> int:
        """Seconds until ``address`` may try to authenticate again (0: now)."""
        return self.store.auth_retry_after(address, limit, window)

    def record_auth_failure(self, address: str, window: float) -> int:
        """Count a failed authentication of ``address``; its failures in the current window."""
        return self.store.record_auth_failure(address, window)

    def clear_auth_failures(self, address: str) -> None:
        self.store.clear_auth_failures(address)

    # ------------------------------------------------------------------ helpers

    def _refused_start(self, run_id: str, exc: Exception) -> BrokerUnavailable:
        """The first message of a run just recorded could not be published: delete the run again (write, then
        publish: a step's claim needs the row), so a refused start leaves nothing. The idempotency key, if
        any, is free again."""
        try:
            discarded = discard_unpublished_run(self.store, run_id)
        except Exception as db_exc:  # noqa: BLE001 - the broker's error is the one to report
            discarded = False
            log.error("refused_start_not_discarded",
                      extra={"run_id": run_id, "error": f"{type(db_exc).__name__}: {db_exc}"})
        where = f"{type(exc).__name__}: {exc}"
        if discarded:
            log.warning("start_refused", extra={"run_id": run_id, "error": where, "recorded": "nothing"})
            return BrokerUnavailable(
                f"the broker refused the run's first step ({where}); nothing was recorded: check "
                f"SAGAFLOW_BROKER_URL and that the broker is up, then start the run again"
            )
        log.warning("start_refused", extra={"run_id": run_id, "error": where, "recorded": "the run"})
        return BrokerUnavailable(
            f"run {run_id} was recorded but its first step could not be published ({where}); the recovery "
            f"sweeper re-drives it once the broker is back. Check SAGAFLOW_BROKER_URL and that the broker is up"
        )

    def _check_broker(self) -> None:
        settings = get_settings()
        if settings.embedded_broker:
            try:
                redis.Redis(unix_socket_path=str(settings.embedded_socket), socket_timeout=2).ping()
            except redis.RedisError:
                raise BrokerUnavailable(
                    f"the embedded broker is not running (no Redis on {settings.embedded_socket}): start a "
                    f"worker with `sagaflow worker`, which starts it, or set SAGAFLOW_BROKER_URL"
                ) from None
