"""SagaClient: start, follow, cancel and retry runs. The Python API, the HTTP API and the CLI all use it.

    client = SagaClient.from_env()
    run = client.start("create_booking", {"customer": "c1"}, idempotency_key="order-17")
    run = client.wait(run.id, timeout=30)
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import redis

from sagaflow.app import celery_app, configure, get_settings, get_store, load_sagas
from sagaflow.config.settings import Settings
from sagaflow.errors import BrokerUnavailable, InvalidInput, InvalidTransition, UnknownSaga
from sagaflow.model import clock, policy
from sagaflow.model.definition import registry
from sagaflow.model.events import Origin
from sagaflow.model.query import parse_duration
from sagaflow.model.schedule import Schedule, check_catchup, check_cron, next_tick
from sagaflow.model.schedule import check_name as check_schedule_name
from sagaflow.model.snapshots import Run, StepSpec
from sagaflow.model.status import FINAL_RUN_STATUSES, RunStatus, compensation_rate, counts_by_status
from sagaflow.runtime import publish, waits
from sagaflow.safejson import check_text, ensure_json
from sagaflow.store import Store
from sagaflow.store.counters import Histogram
from sagaflow.store.discard import discard_unpublished_run
from sagaflow.store.retention import PruneResult

log = logging.getLogger("sagaflow.client")

MAX_IDEMPOTENCY_KEY = 200
MAX_BATCH = 1000  # inputs per start_many: one statement's parameters, and one transaction's locks
MAX_RUN_ID = 36  # a uuid4 as text
MAX_NOTE = 2000  # client.resolve's note
INPUT_FIELD = re.compile(r"[A-Za-z0-9_-]{1,100}")  # a top-level input field a search may name


def _origin(by: Origin | None) -> dict:
    """The detail an operator event records of who asked (model.events.Origin); a bare client call records
    ``source=client``."""
    if by is None:
        by = Origin()
    if not isinstance(by, Origin):
        raise InvalidInput(f"by must be a sagaflow.Origin, got {type(by).__name__}")
    for name in ("actor", "client", "reason"):
        value = getattr(by, name)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidInput(f"Origin.{name} must be a string, got {type(value).__name__}")
            check_text(value, f"the {name}")
    return by.detail()


MAX_DELAY = 10**9  # seconds (about 31 years), as a sleep


def utcnow() -> dt.datetime:
    return clock.now()  # the wall clock, or the one sagaflow.testing moves


def start_time(at, delay) -> dt.datetime | None:
    """A delayed start's time from ``at`` (an aware datetime in the future) or ``delay`` (seconds > 0), or None
    for neither. InvalidInput for both, or a bad value."""
    if at is None and delay is None:
        return None
    if at is not None and delay is not None:
        raise InvalidInput("give at or delay, not both")
    now = utcnow()
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 < delay <= MAX_DELAY:
            raise InvalidInput(f"delay is a number of seconds > 0 and at most {MAX_DELAY}, got {delay!r:.80}")
        return now + dt.timedelta(seconds=delay)
    if not isinstance(at, dt.datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise InvalidInput(f"at must be a datetime with a time zone (e.g. 2026-12-07T09:00:00+00:00), got {at!r:.80}")
    if at <= now:
        raise InvalidInput(f"at ({at.isoformat()}) is not in the future; start the run now instead")
    if at > now + dt.timedelta(seconds=MAX_DELAY):
        raise InvalidInput(f"at ({at.isoformat()}) is too far ahead")
    return at.astimezone(dt.timezone.utc)


def check_run_id(run_id) -> str:
    """A run id as given by a caller: a short string that can be looked up. Anything else is InvalidInput
    (a NUL or a lone surrogate would fail in the database driver, not as "unknown run")."""
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID:
        raise InvalidInput(f"a run id is a string of 1 to {MAX_RUN_ID} characters, got {run_id!r:.80}")
    return check_text(run_id, "the run id")


class RunList(list):
    """A page of runs (newest first); ``total`` counts the runs matching the filters: exactly when
    ``total_is_exact``, else at least that many (a search matching more than 10,000 runs past the page)."""

    def __init__(self, runs, total: int, total_is_exact: bool = True) -> None:
        super().__init__(runs)
        self.total = int(total)
        self.total_is_exact = total_is_exact


@dataclass
class Metrics:
    """The aggregates /metrics exposes: the counters the transitions keep (sagaflow/store/counters.py)."""

    run_counts: dict[tuple[str, str], int]  # (saga, status) -> runs now
    run_end_counts: dict[tuple[str, str], int]  # (saga, final status) -> times a run reached it
    step_event_counts: dict[tuple[str, str, str], int]  # (saga, step, event kind) -> events
    step_durations: dict[tuple[str, str, str], Histogram]  # (saga, step, outcome)
    compensation_durations: dict[tuple[str, str, str], Histogram]  # (saga, step, outcome)
    run_durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (saga, final status)
    runs_started: dict[str, int] = field(default_factory=dict)  # saga -> runs ever started (pruned included)
    queued: dict[tuple[str, str], int] = field(default_factory=dict)  # (saga, step or "run") -> in a limit's line


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

    def start(self, saga: str, input: dict | None = None, *, idempotency_key: str | None = None,
              deadline: float | None = None, at: dt.datetime | None = None, delay: float | None = None,
              priority: int | None = None) -> Run:
        """Record the run and publish its first step; returns at once with the run (status pending).

        With an idempotency key that was used before, returns that earlier run and starts nothing.
        ``deadline``: seconds from now (wins over the saga's ``Saga(deadline=)``); a run still live then is
        cancelled by the sweeper and compensates (a ``deadline_passed`` event first).
        ``at`` (a datetime with a time zone) or ``delay`` (seconds): a delayed start. The run is recorded
        ``scheduled`` and the sweeper starts it when due (within one SAGAFLOW_RECOVERY_INTERVAL); its deadline
        counts from then. ``cancel`` before then cancels it, nothing having run.
        ``priority``: 0 to 9, 9 served first (none: 0), carried on every message of the run: under a backlog
        the broker hands out higher-priority runs' steps first (runtime/publish.py).
        """
        start_at = start_time(at, delay)
        return self._start(registry.get(saga), input, idempotency_key, deadline,  # registry: UnknownSaga
                           start_at=start_at, priority=priority)

    def start_many(self, saga: str, inputs, *, idempotency_keys=None, deadline: float | None = None,
                   at: dt.datetime | None = None, delay: float | None = None,
                   priority: int | None = None) -> builtins.list[Run]:
        """Start one run of ``saga`` per input, as ``start`` would each, in one transaction (one SQL statement
        on PostgreSQL) and one pass of publishing; returns the runs in the order of ``inputs``.

        ``idempotency_keys``: None, or one key (or None) per input; a key used before, or earlier in the
        batch, gives that run and starts nothing. ``deadline``, ``at``/``delay`` and ``priority`` apply to
        every run. Every item is checked before anything is written: one bad input or key is an InvalidInput
        naming each bad item, and nothing of the batch is recorded. At most MAX_BATCH inputs per call.
        """
        definition = registry.get(saga)  # UnknownSaga
        start_at = start_time(at, delay)
        if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, (builtins.list, tuple)):
            raise InvalidInput(f"inputs must be a list of JSON objects (dicts), got {type(inputs).__name__}")
        if len(inputs) > MAX_BATCH:
            raise InvalidInput(f"at most {MAX_BATCH} inputs per start_many, got {len(inputs)}: split the batch")
        keys = [None] * len(inputs) if idempotency_keys is None else idempotency_keys
        if isinstance(keys, (str, bytes)) or not isinstance(keys, (builtins.list, tuple)) or len(keys) != len(inputs):
            raise InvalidInput(f"idempotency_keys must be a list with one key (or None) per input "
                               f"({len(inputs)}), got {keys!r:.80}")
        deadline, mode = self._check_start(definition, deadline, priority)
        items, bad = [], []
        for i, (input, key) in enumerate(zip(inputs, keys, strict=True)):
            try:
                items.append((str(uuid.uuid4()), *self._check_item(input, key)))
            except InvalidInput as exc:
                bad.append(f"item {i}: {exc}")
        if bad:
            shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise InvalidInput(f"{len(bad)} of {len(inputs)} items are invalid, nothing was started: {shown}")
        if not items:
            return []
        if start_at is None:
            self._check_broker()
        answers = self.store.create_runs(definition.name, definition.version, items,
                                         [StepSpec.of(s) for s in definition.steps], mode=mode, start_at=start_at,
                                         deadline=deadline, priority=priority or 0)
        created = [run for run, new in answers if new]
        if start_at is not None:
            log.info("runs_start_delayed", extra={"saga": definition.name, "runs": len(created),
                                                   "start_at": start_at.isoformat()})
        elif created:
            self._publish_first_steps(definition, mode, created, priority)
        return [run for run, _ in answers]

    def _check_start(self, definition, deadline, priority) -> tuple[float | None, str]:
        """What a start checks once, whatever the number of runs: the priority, the deadline (default: the
        saga's), that the saga can run; returns the deadline and the policy's mode for the saga."""
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                     or priority not in publish.PRIORITIES):
            raise InvalidInput(f"priority is an integer from 0 to 9 (9 is served first), got {priority!r:.80}")
        if deadline is None:
            deadline = getattr(definition, "deadline", None)
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                     or not 0 < deadline < 10**9):
            raise InvalidInput(f"deadline is a positive number of seconds, got {deadline!r:.80}")
        if not definition.steps:
            raise InvalidInput(f"saga {definition.name!r} has no steps")
        definition.check_runnable()  # DefinitionError: a non-atomic step without a compensation
        # PolicyError: an invalid policy file, or a saga that cannot run plain.
        return deadline, policy.mode_for(definition, get_settings())

    @staticmethod
    def _check_item(input, idempotency_key) -> tuple[dict, str | None]:
        """One run's input (None: {}) and idempotency key, checked; InvalidInput says what is wrong."""
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
        return input, idempotency_key

    def _start(self, definition, input, idempotency_key, deadline, restart_of: tuple[str, str | None] | None = None,
               origin: dict | None = None, start_at: dt.datetime | None = None, priority: int | None = None) -> Run:
        deadline, mode = self._check_start(definition, deadline, priority)
        input, idempotency_key = self._check_item(input, idempotency_key)
        if start_at is None:
            self._check_broker()
        # The run, its steps, its events, its deadline and its counters: one statement on PostgreSQL.
        (run, created), = self.store.create_runs(
            definition.name, definition.version, [(str(uuid.uuid4()), input, idempotency_key)],
            [StepSpec.of(s) for s in definition.steps], mode=mode, start_at=start_at, deadline=deadline,
            priority=priority or 0)
        if not created:
            return run
        if start_at is not None:
            log.info("run_start_delayed", extra={"run_id": run.id, "saga": run.saga,
                                                 "start_at": start_at.isoformat()})
            return run
        if restart_of is not None:
            self.store.link_restart(restart_of[0], run.id, definition.version, restart_of[1], origin)
        try:
            publish.start(definition, run.id, plain=mode == policy.PLAIN, input=input, app=self.app,
                          priority_=priority)
        except Exception as exc:
            raise self._refused_start(run.id, exc) from exc
        if restart_of is not None:
            run = self.store.get_run(run.id)
        return run

    def _publish_first_steps(self, definition, mode: str, runs: builtins.list[Run], priority: int | None) -> None:
        """start_many's publish pass: each new run's first chain, on one broker connection. If the broker
        refuses one, that run and the ones not yet published are deleted again (as a refused start), and
        BrokerUnavailable says which runs did start."""
        published = 0
        try:
            with self.app.producer_or_acquire() as producer:
                for run in runs:
                    publish.start(definition, run.id, plain=mode == policy.PLAIN, input=run.input, app=self.app,
                                  priority_=priority, producer=producer)
                    published += 1
        except Exception as exc:
            refused = [self._refused_start(run.id, exc) for run in runs[published:]]
            started = ", ".join(run.id for run in runs[:published]) or "none"
            raise BrokerUnavailable(f"{published} of {len(runs)} new runs started (ids: {started}); for the "
                                    f"others: {refused[0]}") from exc

    def restart(self, run_id: str, input: dict | None = None, *, by: Origin | None = None) -> Run:
        """Start a new run of a final run's saga and version (the latest version if that one is no longer
        registered, said in the new run's ``restarted_from`` event), with the same input unless ``input`` is
        given. The new run names the old (``restarted_from``); the old gets a ``run_restarted`` event naming
        the new. InvalidTransition for a run that is not final."""
        old = self.store.get_run(check_run_id(run_id), history=False)
        if not old.can_restart:
            raise InvalidTransition(f"run {run_id} is {old.status}: only a final run can be restarted")
        note = None
        try:
            definition = registry.get(old.saga, old.saga_version)
        except UnknownSaga:
            definition = registry.get(old.saga)  # UnknownSaga if the saga is gone altogether
            note = (f"version {old.saga_version} of {old.saga!r} is no longer registered: the restart runs the "
                    f"latest, version {definition.version}")
        run = self._start(definition, old.input if input is None else input, None, None, (old.id, note),
                          _origin(by))
        log.info("restart", extra={"run_id": old.id, "new_run_id": run.id, "saga": run.saga,
                                         "saga_version": run.saga_version})
        return run

    def resolve(self, run_id: str, note: str, *, by: Origin | None = None) -> Run:
        """Settle a run in ``compensation_failed`` or ``stuck`` by hand: it moves to ``resolved`` with the
        note and the time in a ``run_resolved`` event; nothing is published. InvalidInput without a note;
        InvalidTransition for any other status."""
        check_run_id(run_id)
        if not isinstance(note, str) or not note.strip() or len(note) > MAX_NOTE:
            raise InvalidInput(f"a note is required: a non-empty string of at most {MAX_NOTE} characters saying "
                               f"how the run was settled")
        check_text(note, "the note")
        run = self.store.resolve_run(run_id, note.strip(), _origin(by))
        log.info("resolve", extra={"run_id": run_id, "saga": run.saga})
        return run

    def cancel(self, run_id: str, *, by: Origin | None = None) -> Run:
        """Ask a pending, running or waiting run to stop: it stops before its next step and undoes what
        completed. At a gate or a sleep, the step fails and the undoing begins at once; at a child step, the
        child run is cancelled first (it compensates), then this run compensates. A scheduled run (a delayed
        start) is cancelled at once: nothing ran."""
        return waits.cancel(self.store, check_run_id(run_id), _origin(by))

    def signal(self, run_id: str, name: str, payload=None, *, by: Origin | None = None) -> Run:
        """Deliver signal ``name`` (``payload``: any JSON value, the gate's result) to a run, once. A gate
        waiting for it passes and the run goes on; a signal that arrives before the run reaches its gate is
        kept and taken there. Raises InvalidInput (bad name or payload), UnknownRun, InvalidTransition (the
        run is final, its saga has no gate for ``name``, or the signal was already delivered)."""
        return waits.signal(self.store, check_run_id(run_id), name, payload, _origin(by))

    def retry(self, run_id: str, *, by: Origin | None = None) -> Run:
        """Resume the compensations of a run in ``compensation_failed``, where they stopped; or send a run
        ``stuck`` after its pivot forward again, from the step that failed (earlier results read from SQL)."""
        check_run_id(run_id)
        forward = self.store.request_forward_retry(run_id, _origin(by))  # one transaction: there is no fast variant
        if forward is not None:
            start, results = forward
            run = self.store.get_run(run_id, history=False)
            publish.chain_from(registry.get(run.saga, run.saga_version), run_id, start=start, results=results,
                               app=self.app)
            return self.get(run_id)
        todo = self.store.request_retry(run_id, _origin(by))
        if todo:
            publish.compensations_of(run_id, todo)
        else:  # nothing left to undo: the run ended at once
            publish.run_ended(run_id)
        return self.get(run_id)

    # ------------------------------------------------------------------ schedules

    def add_schedule(self, name: str, saga: str, cron: str, input: dict | None = None, *,
                     catchup: str | None = None, paused: bool = False) -> Schedule:
        """Start saga ``saga`` with ``input`` on every tick of ``cron`` (UTC; five fields, or six with the
        seconds last), one run per tick however many sweepers run. ``catchup``: what happens to ticks missed
        while no worker swept, "skip" (none runs) or "once" (one run for the latest); default
        SAGAFLOW_SCHEDULE_CATCHUP. Raises InvalidInput, UnknownSaga, InvalidTransition (the name is taken)."""
        check_schedule_name(name)
        registry.get(saga)  # UnknownSaga: a schedule of a saga no process registers would never fire
        cron = check_cron(cron)
        if input is None:
            input = {}
        if not isinstance(input, dict):
            raise InvalidInput(f"input must be a JSON object (a dict), got {type(input).__name__}")
        input = ensure_json(input, "input", get_settings().json_limits)
        mode = check_catchup(get_settings().schedule_catchup if catchup is None else catchup)
        if not isinstance(paused, bool):
            raise InvalidInput(f"paused must be true or false, got {paused!r:.40}")
        schedule = self.store.add_schedule(name, saga, cron, input, mode.value, next_tick(cron, utcnow()), paused)
        log.info("schedule_added", extra={"schedule": name, "saga": saga, "cron": cron})
        return schedule

    def schedules(self) -> builtins.list[Schedule]:
        return self.store.list_schedules()

    def schedule(self, name: str) -> Schedule:
        return self.store.get_schedule(check_schedule_name(name))

    def pause_schedule(self, name: str) -> Schedule:
        """No tick fires until ``resume_schedule``."""
        return self.store.pause_schedule(check_schedule_name(name), True)

    def resume_schedule(self, name: str) -> Schedule:
        """Fire again from the next tick; the ticks that fell while paused never fire."""
        schedule = self.schedule(name)
        return self.store.pause_schedule(name, False, next_tick(schedule.cron, utcnow()))

    def remove_schedule(self, name: str) -> None:
        """Delete the schedule; the runs it started stay."""
        self.store.remove_schedule(check_schedule_name(name))
        log.info("schedule_removed", extra={"schedule": name})

    # ------------------------------------------------------------------ queries

    def get(self, run_id: str) -> Run:
        return self.store.get_run(check_run_id(run_id))

    def list(self, status: str | None = None, saga: str | None = None, limit: int = 50, offset: int = 0, *,
             since: dt.datetime | None = None, until: dt.datetime | None = None,
             idempotency_key: str | None = None, input: dict | None = None) -> RunList:
        """Runs newest first, ``limit`` from ``offset``; ``total`` counts all that match. Filters: ``status``,
        ``saga``, ``since``/``until`` (aware datetimes bounding the run's start: since <= start < until),
        ``idempotency_key``, ``input`` (top-level fields that must equal the run's input fields; a string
        also matches a number, boolean or null written the same way, as the HTTP API and CLI pass text)."""
        if status is not None and status not in {s.value for s in RunStatus}:
            raise InvalidInput(f"unknown status {status!r} (one of: {', '.join(s.value for s in RunStatus)})")
        if not (isinstance(limit, int) and 1 <= limit <= 1000) or not (isinstance(offset, int) and offset >= 0):
            raise InvalidInput("limit must be 1..1000 and offset >= 0")
        for name, value in (("since", since), ("until", until)):
            if value is not None and (not isinstance(value, dt.datetime) or value.tzinfo is None
                                      or value.utcoffset() is None):
                raise InvalidInput(f"{name} must be an aware datetime (with a time zone), got {value!r:.80}")
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
                raise InvalidInput(f"idempotency_key must be a non-empty string of at most "
                                   f"{MAX_IDEMPOTENCY_KEY} characters")
            check_text(idempotency_key, "idempotency_key")
        if input is not None:
            if not isinstance(input, dict):
                raise InvalidInput(f"input must be a dict of top-level fields, got {type(input).__name__}")
            for field in input:
                if not isinstance(field, str) or not INPUT_FIELD.fullmatch(field):
                    raise InvalidInput(f"input field names are 1 to 100 letters, digits, '_' or '-', "
                                       f"got {field!r:.80}")
            input = ensure_json(input, "input", get_settings().json_limits)
        runs, total = self.store.list_runs(status=status, saga=saga, limit=limit, offset=offset, since=since,
                                           until=until, idempotency_key=idempotency_key, input=input or None)
        return RunList(runs, total, getattr(total, "exact", True))

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

    # ------------------------------------------------------------------ for the faces (web/, cli/)
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

    def find(self, text: str, limit: int = 10) -> builtins.list[str]:
        """Run ids that ``text`` names: an id prefix (at least 4 characters, as the page's 8-character ids)
        or an idempotency key; newest first."""
        if not isinstance(text, str) or not 0 < len(text.strip()) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"give an id prefix or an idempotency key (1 to {MAX_IDEMPOTENCY_KEY} characters)")
        return self.store.find_runs(check_text(text, "the search"), limit)

    def attention(self, limit: int = 20) -> builtins.list[Run]:
        """The runs that need an operator: compensation_failed, stuck, waiting at a gate, past their deadline;
        the longest wait first."""
        return self.store.attention_runs(limit)

    def step_marks(self, run_ids) -> dict:
        """{run id: StepMark}: the step each run failed at, failed to undo, or waits at, with its error."""
        return self.store.step_marks(run_ids)

    def workers(self) -> builtins.list[dict]:
        """The live workers (heartbeat within SAGAFLOW_WORKER_DEAD_AFTER s), oldest first, each with the steps
        its pool holds: {"id", "hostname", "pid", "queues", "started_at", "heartbeat_at", "age", "holds"}."""
        return self.store.live_workers(get_settings().worker_dead_after)

    def map_items(self, run_id: str, limit: int = 100) -> dict[int, dict]:
        """The run's map steps, by step index: {"counts": {item status: n}, "total", "items": the first ``limit``
        items as {"item", "status", "attempts", "error"}}. Empty for a run without map steps."""
        return self.store.map_summary(run_id, limit)

    def step_duration_percentiles(self) -> dict[tuple[str, str], dict]:
        """{(saga, step): {"count", "max", "p50", "p90", "p99"}} of the steps' durations, in seconds."""
        return self.store.step_duration_percentiles()

    def metrics(self) -> "Metrics":
        """Everything /metrics exposes, read at once in one statement (nothing is kept in the process): the
        counters the transitions keep in SQL (store/counters.py), so a scrape costs the same with a million
        runs as with a thousand, and a prune never lowers a counter."""
        read = self.store.counter_values()
        h = read.histograms
        return Metrics(read.live, read.finished, read.steps, h["step_duration"], h["compensation_duration"],
                       {(saga, outcome): v for (saga, _, outcome), v in h["run_duration"].items()}, read.started,
                       self.store.queued_counts())

    def prune(self, older_than, dry_run: bool = False) -> PruneResult:
        """Delete the runs that ended (succeeded, compensated, cancelled, failed, resolved) more than
        ``older_than`` ago (a timedelta, or text: ``90s``, ``15m``, ``12h``, ``30d``), with their steps, events
        and signals, in short batches; never a live, waiting, stuck or compensation_failed run, nor a parent
        with a child that has not ended. The metrics keep what they counted. ``dry_run``: count only."""
        if isinstance(older_than, str):
            older_than = parse_duration(older_than, "older_than")
        if not isinstance(older_than, dt.timedelta) or older_than <= dt.timedelta(0):
            raise InvalidInput(f"older_than must be a positive duration (30d, 12h...), got {older_than!r:.80}")
        cutoff = dt.datetime.now(dt.timezone.utc) - older_than
        result = self.store.prune(cutoff, dry_run=dry_run)
        log.info("pruned", extra={"runs": result.runs, "cutoff": cutoff.isoformat(), "dry_run": dry_run})
        return result

    def stats(self, saga: str | None = None) -> dict:
        """Counts by status and by saga, the success rate of the runs that ended, the compensation rate, and
        run and step duration percentiles (seconds), over the runs the database holds now."""
        counts = self.store.run_counts(saga)
        by_saga: dict[str, dict[str, int]] = {}
        for (name, status), n in sorted(counts.items()):
            by_saga.setdefault(name, {})[status] = n
        by_status = counts_by_status(counts)
        ended = sum(n for status, n in by_status.items() if status in {s.value for s in FINAL_RUN_STATUSES})
        steps: dict[str, dict[str, dict]] = {}
        for (name, step), entry in sorted(self.store.step_duration_percentiles().items()):
            if saga is None or name == saga:
                steps.setdefault(name, {})[step] = entry
        return {
            "total": sum(counts.values()),
            "by_status": by_status,
            "by_saga": by_saga,
            "success_rate": round(by_status[RunStatus.SUCCEEDED.value] / ended, 4) if ended else None,
            "compensation_rate": compensation_rate(counts),
            "run_duration_seconds": {f"{name}/{status}": entry for (name, status), entry
                                     in sorted(self.store.run_duration_percentiles(saga).items())},
            "step_duration_seconds": steps,
        }

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
