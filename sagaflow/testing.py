"""Test your sagas in one process: ``SagaHarness`` runs them through sagaflow's real runtime.

What is real: the Celery tasks of every step and compensation, their chains, errbacks (sent as messages),
retries, the claims and guarded transitions in SQL, the recovery sweeper; your actions and compensations.
What is in-process instead of a server: the broker is kombu's in-memory transport, consumed by a real Celery
worker in a thread (a ``threads`` pool: time limits are not enforced), and the state is a SQLite file in a
temporary folder. No Redis, no PostgreSQL, and never Celery's eager mode (which runs chains differently and
hides errbacks and redeliveries, the behaviour a saga depends on).

Time is the harness's own (sagaflow/model/clock.py): a retry delay moves the clock on at once instead of
waiting, and when nothing is in flight but the run waits for a deadline (``Saga(deadline=)``, a gate's
``timeout``), the harness moves the clock to it and sweeps. A one-hour retry delay passes in no wall time.

Faults, by step (``"step"``, or ``"saga.step"`` when two sagas share a step name):

- ``fail(step)``: the step's action fails for good (a NonRetryableError, never retried): the run compensates.
- ``fail_times(step, n)``: the action fails n times with a retryable error, then runs; the step's retry
  policy decides whether it gets that far.
- ``fail_compensation(step, times=None)``: the compensation fails (always, or ``times`` times per run).
- ``deliver_twice(step)``: the step's message is delivered again after its first delivery ran, as a broker
  does after a lost acknowledgement: your action must stay correct (its idempotency key is the same).

Counts are per run. Use it as a context manager (it configures sagaflow for this process and puts the
previous settings back at exit)::

    with SagaHarness() as saga_test:
        saga_test.fail("send_email")
        run = saga_test.run("create_booking", {"customer": "ada"})
        assert run.status == "compensated"
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish, task_postrun
from celery.worker import state as worker_state
from kombu.transport import memory

from sagaflow import app as sagaflow_app
from sagaflow.app import celery_app, configure, load_sagas
from sagaflow.client import SagaClient
from sagaflow.config.settings import Settings
from sagaflow.errors import NonRetryableError, SagaflowError
from sagaflow.model import Run, RunStatus, clock
from sagaflow.model.definition import StepContext, registry
from sagaflow.runtime import recovery, steps
from sagaflow.runtime.compiler import step_task_name
from sagaflow.store.workers import current_worker, set_current_worker

log = logging.getLogger("sagaflow.testing")

__all__ = ["InjectedFailure", "InjectedFault", "SagaHarness"]

_active = threading.Lock()  # held while a harness runs: it configures the whole process


@celery_app.task(name="sagaflow.testing.wake", ignore_result=True)
def _wake() -> None:
    """Does nothing: its message wakes the harness's worker thread so it notices that it must stop."""


class InjectedFailure(NonRetryableError):
    """A step failed for good because the harness said so (``fail``)."""


class InjectedFault(Exception):
    """A passing fault the harness injected (``fail_times``, ``fail_compensation``): retried per the policy."""


def _key(step: str, saga: str | None) -> str:
    if not isinstance(step, str) or not step:
        raise ValueError(f"a step name is a non-empty string, got {step!r}")
    return f"{saga}.{step}" if saga else step


class _Faults:
    """What to inject, and how often it happened, per run. Read by the worker's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fail: set[str] = set()
        self.fail_times: dict[str, int] = {}
        self.fail_compensation: dict[str, int | None] = {}
        self.twice: set[str] = set()
        self.seen: Counter = Counter()  # (phase, run_id, key) -> calls so far
        self.redelivered: set[tuple[str, str]] = set()  # (run id, step) delivered a second time

    @staticmethod
    def matches(table, ctx_saga: str, ctx_step: str):
        for key in (f"{ctx_saga}.{ctx_step}", ctx_step):
            if key in table:
                return key
        return None

    def intercept(self, phase: str, ctx: StepContext, call: Callable[[StepContext], object]):
        with self.lock:
            if phase == "step":
                if self.matches(self.fail, ctx.saga, ctx.step) is not None:
                    raise InjectedFailure(f"injected: step {ctx.step!r} fails")
                key = self.matches(self.fail_times, ctx.saga, ctx.step)
                if key is not None:
                    self.seen[(phase, ctx.run_id, key)] += 1
                    if self.seen[(phase, ctx.run_id, key)] <= self.fail_times[key]:
                        raise InjectedFault(f"injected: step {ctx.step!r} fails "
                                            f"(time {self.seen[(phase, ctx.run_id, key)]})")
            else:
                key = self.matches(self.fail_compensation, ctx.saga, ctx.step)
                if key is not None:
                    self.seen[(phase, ctx.run_id, key)] += 1
                    times = self.fail_compensation[key]
                    if times is None or self.seen[(phase, ctx.run_id, key)] <= times:
                        raise InjectedFault(f"injected: compensation of {ctx.step!r} fails")
        return call(ctx)


class SagaHarness:
    """sagaflow in one process, for tests: see the module's documentation.

    ``imports``: modules that register sagas (as SAGAFLOW_IMPORTS); sagas already registered in this process
    (defined in the test module, say) are there anyway. ``saga_files``: YAML saga files. ``concurrency``: the
    worker's threads. ``settings``: more SAGAFLOW_* variables (as strings), e.g. ``{"SAGAFLOW_POLICY": ...}``.
    """

    def __init__(self, *, imports: tuple[str, ...] | list[str] = (), saga_files: tuple[str, ...] | list[str] = (),
                 concurrency: int = 4, settings: dict[str, str] | None = None) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
        self._imports = list(imports)
        self._saga_files = [str(f) for f in saga_files]
        self._concurrency = concurrency
        self._extra = dict(settings or {})
        self._faults = _Faults()
        self._stack: ExitStack | None = None
        self._folder: Path | None = None
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.clock = clock.ManualClock()
        self.client: SagaClient | None = None
        self.settings: Settings | None = None

    # ------------------------------------------------------------------------------------------ faults

    def fail(self, step: str, saga: str | None = None) -> SagaHarness:
        """The step's action fails for good at every run (InjectedFailure); its retries are not tried."""
        with self._faults.lock:
            self._faults.fail.add(_key(step, saga))
        return self

    def fail_times(self, step: str, times: int, saga: str | None = None) -> SagaHarness:
        """The step's action fails ``times`` times per run with a retryable error (InjectedFault), then runs."""
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive integer, got {times!r}")
        with self._faults.lock:
            self._faults.fail_times[_key(step, saga)] = times
        return self

    def fail_compensation(self, step: str, times: int | None = None, saga: str | None = None) -> SagaHarness:
        """The step's compensation fails (InjectedFault): every time (None), or ``times`` times per run."""
        if times is not None and (not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive integer or None, got {times!r}")
        with self._faults.lock:
            self._faults.fail_compensation[_key(step, saga)] = times
        return self

    def deliver_twice(self, step: str, saga: str | None = None) -> SagaHarness:
        """The step's message is delivered a second time once its first delivery ran (once per run)."""
        with self._faults.lock:
            self._faults.twice.add(_key(step, saga))
        return self

    def clear_faults(self) -> None:
        """Forget every fault injected so far (and what they counted)."""
        self._faults = _Faults()

    @property
    def redelivered(self) -> set[tuple[str, str]]:
        """The (run id, step) pairs ``deliver_twice`` delivered a second time."""
        with self._faults.lock:
            return set(self._faults.redelivered)

    # ------------------------------------------------------------------------------------------ running

    def start(self, saga: str, input: dict | None = None, **options) -> str:
        """Start a run (``SagaClient.start``'s options) and return its id at once."""
        return self._client().start(saga, input, **options).id

    def run(self, saga: str, input: dict | None = None, *, timeout: float = 30.0, **options) -> Run:
        """Start a run and wait for it (``wait``)."""
        return self.wait(self.start(saga, input, **options), timeout=timeout)

    def get(self, run_id: str) -> Run:
        return self._client().get(run_id)

    def signal(self, run_id: str, name: str, payload=None) -> Run:
        return self._client().signal(run_id, name, payload)

    def cancel(self, run_id: str) -> Run:
        return self._client().cancel(run_id)

    def wait(self, run_id: str, *, timeout: float = 30.0, skip_time: bool = True) -> Run:
        """Until the run ends, and return it (the client's Run). When nothing is in flight and the run waits
        for a time (its deadline, a gate's timeout), the clock is moved there and the sweeper runs, unless
        ``skip_time`` is False. A run that waits for a signal (or with ``skip_time`` False, for a time) is
        returned as it stands, ``waiting``. Raises TimeoutError after ``timeout`` seconds of wall time."""
        client = self._client()
        limit = time.monotonic() + timeout
        jumps = 0
        while True:
            run = client.get(run_id)
            if run.is_final:
                return run
            if time.monotonic() > limit:
                raise TimeoutError(f"run {run_id} is still {run.status} after {timeout} s (wall time)")
            if not self._idle():
                time.sleep(0.01)
                continue
            run = client.get(run_id)  # nothing in flight: what the run waits for now is all it has
            if run.is_final:
                return run
            if not skip_time:
                if run.status == RunStatus.WAITING.value:
                    return run
                time.sleep(0.01)
                continue
            target = self._next_time(run)
            if target is not None:
                self.advance((target - self.clock.now()).total_seconds() + 0.001)
                continue
            if run.status == RunStatus.WAITING.value:
                return run
            # Live, nothing in flight, no time to wait for: a message was lost; the sweeper re-drives it once
            # it counts as stalled.
            jumps += 1
            if jumps > 20:
                raise SagaflowError(f"run {run_id} stays {run.status} with nothing in flight")
            assert self.settings is not None
            self.advance(float(self.settings.stall_timeout) + 1)

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds`` (at least 0) and run the recovery sweeper once, as the workers'
        sweep would: deadlines and gate timeouts that passed are acted on."""
        self.clock.advance(max(0.0, seconds))
        self.sweep()

    def sweep(self) -> None:
        recovery.recover_stalled()

    def _next_time(self, run: Run) -> dt.datetime | None:
        times = [run.deadline_at] + [s.deadline_at for s in run.steps]
        now = self.clock.now()
        later = [t for t in times if t is not None]
        if not later:
            return None
        return max(min(later), now)

    def _idle(self) -> bool:
        """No message queued or running, twice in a row a few milliseconds apart."""
        for _ in range(2):
            with self._count_lock:
                counted = self._in_flight
            queued = sum(q.qsize() for q in list(memory.Channel.queues.values()))
            if counted > 0 or queued > 0:
                return False
            time.sleep(0.005)
        return True

    def _client(self) -> SagaClient:
        if self.client is None:
            raise SagaflowError("the harness is not started: use `with SagaHarness() as harness:`")
        return self.client

    # ------------------------------------------------------------------------------------------ set up

    def __enter__(self) -> SagaHarness:
        if not _active.acquire(blocking=False):
            raise SagaflowError("one SagaHarness at a time per process: it configures sagaflow for the whole "
                                "process (leave the other `with` block first)")
        stack = ExitStack()
        stack.callback(_active.release)
        try:
            self._setup(stack)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _setup(self, stack: ExitStack) -> None:
        from sagaflow.store.migrate import upgrade

        folder = Path(tempfile.mkdtemp(prefix="sagaflow-test-"))
        stack.callback(shutil.rmtree, folder, True)
        self._folder = folder
        database_url = f"sqlite:///{folder / 'state.db'}"
        env = {
            "SAGAFLOW_HOME": str(folder),
            "SAGAFLOW_DATABASE_URL": database_url,
            "SAGAFLOW_BROKER_URL": "memory://localhost/",
            "SAGAFLOW_IMPORTS": ",".join(self._imports),
            "SAGAFLOW_SAGA_FILES": ",".join(self._saga_files),
            "SAGAFLOW_WORKER_SWEEPS": "0",  # the harness sweeps when nothing is in flight (wait)
            # Retry delays go out as countdowns, which the moved clock passes at once (model/clock.py); the
            # SQL-kept wait of long delays is tested against a real worker (tests/integration/test_timers.py).
            "SAGAFLOW_DURABLE_RETRY_AFTER": str(10**9),
            **self._extra,
        }
        settings = Settings.from_env({k: v for k, v in env.items() if v != ""})
        previous = sagaflow_app._settings
        stack.callback(self._restore, previous)
        memory.Channel.queues.clear()  # nothing left over from an earlier harness
        configure(settings)
        # kombu's virtual transports poll their queues, every second by default: a hop would cost that.
        celery_app.conf.broker_transport_options = {**celery_app.conf.broker_transport_options,
                                                    "polling_interval": 0.005}
        self.settings = settings
        upgrade(database_url)
        load_sagas(settings)

        # The worker thread registers itself as this process's worker (runtime/liveness.py): put it back.
        stack.callback(set_current_worker, current_worker())
        previous_clock = clock.use(self.clock)
        stack.callback(clock.use, previous_clock)
        previous_interceptor = steps.intercept(self._faults_intercept)
        stack.callback(steps.intercept, previous_interceptor)

        before_task_publish.connect(self._published, weak=False)
        stack.callback(before_task_publish.disconnect, self._published)
        task_postrun.connect(self._ran, weak=False)
        stack.callback(task_postrun.disconnect, self._ran)

        queues = sorted({"celery"} | {step.queue for saga in registry.all() for step in saga.steps if step.queue})
        stack.enter_context(start_worker(celery_app, pool="threads", concurrency=self._concurrency,
                                         perform_ping_check=False, queues=queues, loglevel="WARNING",
                                         shutdown_timeout=30.0))
        stack.callback(self._wake_worker_to_stop)
        self.client = SagaClient()
        stack.callback(setattr, self, "client", None)

    @staticmethod
    def _wake_worker_to_stop() -> None:
        # The worker thread notices the stop between two polls of the broker, which wait up to 2 s for a
        # message: a message ends that wait at once.
        worker_state.should_terminate = 0
        try:
            for _ in range(3):  # the loop polls once more after it saw the stop (a `finally` in celery's synloop)
                _wake.apply_async()
        except Exception:  # noqa: BLE001 - then it stops after its poll
            pass

    def _restore(self, previous: Settings | None) -> None:
        memory.Channel.queues.clear()
        if previous is not None:
            configure(previous)
        else:
            sagaflow_app._settings = None

    def _faults_intercept(self, phase: str, ctx: StepContext, call: Callable[[StepContext], object]):
        return self._faults.intercept(phase, ctx, call)

    # Messages in flight: +1 when one is published, -1 when a task has run (whatever its outcome: a retry
    # or an errback is a message of its own, counted when it is published).

    def _published(self, sender=None, headers=None, **_) -> None:
        with self._count_lock:
            self._in_flight += 1

    def _ran(self, sender=None, task=None, task_id=None, state=None, **_) -> None:
        try:
            self._redeliver(task, state)
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def _redeliver(self, task, state) -> None:
        saga_name, step_name = getattr(task, "saga_name", ""), getattr(task, "step_name", "")
        if not saga_name or task is None or task.name.endswith(".compensate") or state != "SUCCESS":
            return
        faults = self._faults
        with faults.lock:
            if faults.matches(faults.twice, saga_name, step_name) is None:
                return
            run_id = (task.request.kwargs or {}).get("run_id")
            if run_id is None or (run_id, step_name) in faults.redelivered:
                return
            faults.redelivered.add((run_id, step_name))
        saga = registry.get(saga_name)
        assert task.name == step_task_name(saga, next(s for s in saga.steps if s.name == step_name))
        log.info("harness_redelivery", extra={"run_id": run_id, "step": step_name})
        task.signature_from_request(task.request).apply_async()
