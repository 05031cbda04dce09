"""Saga definitions: plain data and validation, no Celery here.

A saga is an ordered list of steps; each step pairs an action with the compensation that undoes it, so a
reader sees both in one place:

    booking = Saga("create_booking", version=1)

    @booking.step(retry=RetryPolicy(max_attempts=3), timeout=10)
    def create_invoice(ctx): ...

    @create_invoice.compensation
    def cancel_invoice(ctx): ...

Sagas assembled at run time use the plain form: ``Saga(name, steps=[Step(name, action, compensation)])``.
Every saga registers itself in ``registry`` when it is created; the runtime listens to the registry and
declares the matching Celery tasks.
"""

from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable

from sagaflow.errors import DefinitionError, NonRetryableError, UnknownSaga

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RetryKind(str, Enum):
    """How the delay between attempts grows."""

    EXPONENTIAL = "exponential"  # initial_interval * backoff ** (n - 1)
    LINEAR = "linear"  # initial_interval + increment * (n - 1)
    FIXED = "fixed"  # initial_interval every time

    def __str__(self) -> str:
        return self.value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` starts per ``period`` seconds, across every worker: ``"10/s"``, ``"100/m"``, ``"5/h"``
    (any window of ``period`` seconds holds at most ``count`` starts)."""

    count: int
    period: float

    @classmethod
    def parse(cls, text, where: str) -> RateLimit:
        match = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([smh])\s*", text) if isinstance(text, str) else None
        if match is None or int(match.group(1)) < 1:
            raise DefinitionError(f"{where}: rate_limit must look like \"10/s\", \"100/m\" or \"5/h\" (a count "
                                  f">= 1 per second, minute or hour), got {text!r}")
        return cls(int(match.group(1)), RATE_PERIODS[match.group(2)])

    def __str__(self) -> str:
        unit = next(u for u, seconds in RATE_PERIODS.items() if seconds == self.period)
        return f"{self.count}/{unit}"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how fast a failing action (or compensation) is tried again.

    The delay before attempt n+1 (after attempt n failed) depends on ``kind``:

    - ``"exponential"`` (the default): ``initial_interval * backoff ** (n - 1)``;
    - ``"linear"``: ``initial_interval + increment * (n - 1)``, where ``increment`` defaults to
      ``initial_interval`` (so 1, 2, 3... for an interval of 1);
    - ``"fixed"``: ``initial_interval`` every time.

    Every kind is capped at ``max_interval``. With ``jitter`` the delay is drawn between half and all of
    that ("equal jitter"), so retries of many runs spread out but never fire at once. Exceptions in
    ``non_retryable`` (and sagaflow's ``NonRetryableError``) fail at the first attempt.

    ``backoff`` applies to the exponential kind only and ``increment`` to the linear kind only; setting
    either for another kind is refused rather than silently ignored.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float | None = None  # exponential only; None means 2.0
    max_interval: float = 60.0
    jitter: bool = True
    non_retryable: tuple[type[BaseException], ...] = ()
    # New fields go last, so positional arguments written for the earlier constructor keep their meaning.
    kind: RetryKind | str = RetryKind.EXPONENTIAL
    increment: float | None = None  # linear only; None means initial_interval

    def __post_init__(self) -> None:
        try:
            kind = RetryKind(self.kind)
        except ValueError:
            allowed = ", ".join(repr(k.value) for k in RetryKind)
            raise DefinitionError(f"retry kind must be one of {allowed}, got {self.kind!r}") from None
        object.__setattr__(self, "kind", kind)
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise DefinitionError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("initial_interval", "max_interval"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise DefinitionError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not isinstance(self.jitter, bool):
            raise DefinitionError(f"jitter must be True or False, got {self.jitter!r}")
        if kind is RetryKind.EXPONENTIAL:
            if self.backoff is None:
                object.__setattr__(self, "backoff", 2.0)
            elif not _is_number(self.backoff) or self.backoff < 1:
                raise DefinitionError(f"backoff must be a number >= 1, got {self.backoff!r}")
        elif self.backoff is not None:
            raise DefinitionError(f"backoff applies to kind 'exponential' only, got backoff={self.backoff!r} "
                                  f"with kind {kind.value!r}")
        if kind is RetryKind.LINEAR:
            if self.increment is None:
                object.__setattr__(self, "increment", self.initial_interval)
            elif not _is_number(self.increment) or self.increment < 0:
                raise DefinitionError(f"increment must be a number of seconds >= 0, got {self.increment!r}")
        elif self.increment is not None:
            raise DefinitionError(f"increment applies to kind 'linear' only, got increment={self.increment!r} "
                                  f"with kind {kind.value!r}")
        try:
            object.__setattr__(self, "non_retryable", tuple(self.non_retryable))
        except TypeError:
            raise DefinitionError(f"non_retryable must be a tuple of exception classes, "
                                  f"got {self.non_retryable!r}") from None
        for exc_type in self.non_retryable:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise DefinitionError(f"non_retryable must hold exception classes, got {exc_type!r}")

    def nominal_delay(self, failed_attempt: int) -> float:
        """The delay after attempt ``failed_attempt`` (1-based) failed, capped, before jitter."""
        n = max(1, failed_attempt)
        if self.kind is RetryKind.FIXED:
            base = self.initial_interval
        elif self.kind is RetryKind.LINEAR:
            assert self.increment is not None  # __post_init__ sets it for the linear kind
            base = self.initial_interval + self.increment * (n - 1)
        else:
            assert self.backoff is not None  # __post_init__ sets it for the exponential kind
            try:
                base = self.initial_interval * self.backoff ** (n - 1)
            except OverflowError:  # a huge attempt number: the cap applies anyway
                base = math.inf
        return min(self.max_interval, base)

    def delay(self, failed_attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        base = self.nominal_delay(failed_attempt)
        return base * (0.5 + rand() / 2) if self.jitter else base

    def allows_retry(self, exc: BaseException, failed_attempt: int) -> bool:
        if isinstance(exc, (NonRetryableError, *self.non_retryable)):
            return False
        return failed_attempt < self.max_attempts


DEFAULT_RETRY = RetryPolicy()
# A step after the pivot that sets no retry of its own: the saga can no longer be undone, so it tries harder
# to go forward before it leaves the run stuck for an operator (about 4 minutes of retries in all).
DEFAULT_FORWARD_RETRY = RetryPolicy(max_attempts=8, initial_interval=1.0, backoff=2.0, max_interval=60.0)
# An undo must happen: compensations try harder before a run is left to an operator.
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=5, initial_interval=1.0, backoff=2.0, max_interval=60.0)


@dataclass(frozen=True)
class StepContext:
    """What an action or a compensation receives.

    ``results`` holds the results of the earlier steps by name; ``result`` is, for a compensation, the
    result of the action it undoes. ``idempotency_key`` is stable across retries and redeliveries of the
    same step of the same run: pass it to external APIs so a repeated call does nothing twice.
    """

    run_id: str
    saga: str
    step: str
    input: dict[str, Any]
    attempt: int
    idempotency_key: str
    results: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    _heartbeat: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # A map step's item (Saga.map): the item and its index in the list; None for every other step.
    item: Any = None
    item_index: int | None = None

    def heartbeat(self) -> None:
        """Tell sagaflow this step is alive: push its lease forward. A long step that sets ``lease`` shorter
        than its ``timeout`` calls this more often than ``lease`` seconds apart; if its worker dies, the
        recovery sweeper re-drives the step once the lease runs out, instead of after the whole timeout.
        Raises LeaseLost if another delivery took the step over (stop: that one does the work), and
        SagaCancelled if the run was cancelled meanwhile (the step fails and the run is compensated)."""
        if self._heartbeat is not None:
            self._heartbeat()


Action = Callable[[StepContext], Any]
ChildInput = Callable[[StepContext], dict]
MapItems = Callable[[StepContext], list]
SleepFor = Callable[[StepContext], float]
# The longest sleep (about 31 years): a timestamp the database and Python both keep.
MAX_SLEEP = 10**9


def check_sleep_seconds(seconds: Any, what: str) -> float:
    """A sleep's duration: a number of seconds > 0 (and at most MAX_SLEEP). Returns it as a float."""
    if not _is_number(seconds) or not 0 < seconds <= MAX_SLEEP:
        raise DefinitionError(f"{what}: seconds must be a number > 0 and at most {MAX_SLEEP}, got {seconds!r:.80}")
    return float(seconds)


class StepKind(str, Enum):
    """What a step does when the chain reaches it."""

    ACTION = "action"  # call the action
    GATE = "gate"  # wait, holding no worker, for a named signal (client.signal) or its timeout
    CHILD = "child"  # start another saga as a child run; done when the child succeeds
    SLEEP = "sleep"  # wait, holding no worker and no message, until a time kept in SQL (a durable timer)
    MAP = "map"  # run the action once per item of a list, a bounded number at once (Saga.map)

    def __str__(self) -> str:
        return self.value


class Step:
    """One step: an action, optionally a compensation, and options.

    - ``best_effort``: a failure (after its retries) is recorded and the run goes on; nothing is undone.
    - ``non_atomic``: the action may have done part of its work when it fails, so its own compensation
      runs too (first) when it fails for good.
    - ``pivot``: once it succeeds the saga can no longer be undone; later steps retry forward, and a step
      that still fails leaves the run ``stuck``, waiting for an operator, never half-compensated.
    - ``group``: set by ``Saga.parallel``: the steps of one group run at the same time, joined before the
      next step.
    """

    def __init__(
        self,
        name: str,
        action: Action | None,
        compensation: Action | None = None,
        *,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        timeout: float | None = None,
        lease: float | None = None,
        queue: str | None = None,
        best_effort: bool = False,
        non_atomic: bool = False,
        pivot: bool = False,
        kind: StepKind | str = StepKind.ACTION,
        signal: str | None = None,
        child_saga: str | None = None,
        child_input: ChildInput | None = None,
        compensation_timeout: float | None = None,
        payload_required: bool = False,
        seconds: float | SleepFor | None = None,
        concurrency: int | None = None,
        rate_limit: str | None = None,
        items: MapItems | None = None,
        map_concurrency: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise DefinitionError(f"step name {name!r} must be an identifier (letters, digits, underscore)")
        try:
            kind = StepKind(kind)
        except ValueError:
            raise DefinitionError(f"step {name!r}: kind must be one of "
                                  f"{', '.join(k.value for k in StepKind)}, got {kind!r}") from None
        if kind is StepKind.MAP and (action is None) == (child_saga is None):
            raise DefinitionError(f"map {name!r}: a map has either an action (run once per item) or a child "
                                  f"saga (one child run per item), never both and never neither")
        if (kind is StepKind.ACTION or kind is StepKind.MAP and child_saga is None) and not callable(action):
            raise DefinitionError(f"step {name!r}: action must be callable, got {action!r}")
        if kind is StepKind.MAP:
            check_map(name, items, map_concurrency, best_effort or pivot)
        elif items is not None or map_concurrency is not None:
            raise DefinitionError(f"step {name!r}: only a map step takes items or a map concurrency")
        for option, flag in (("best_effort", best_effort), ("non_atomic", non_atomic), ("pivot", pivot)):
            if not isinstance(flag, bool):
                raise DefinitionError(f"step {name!r}: {option} must be True or False, got {flag!r}")
        if best_effort and pivot:
            raise DefinitionError(f"step {name!r}: a pivot cannot be best-effort (its success is what commits "
                                  f"the saga)")
        if kind is StepKind.GATE:
            if not isinstance(signal, str) or not NAME_PATTERN.match(signal):
                raise DefinitionError(f"gate {name!r}: signal must be an identifier, got {signal!r}")
            if timeout is None:
                raise DefinitionError(f"gate {name!r}: give a timeout (seconds): a gate never waits forever")
        elif signal is not None or payload_required:
            raise DefinitionError(f"step {name!r}: only a gate waits for a signal")
        if not isinstance(payload_required, bool):
            raise DefinitionError(f"gate {name!r}: payload_required must be True or False, got {payload_required!r}")
        if kind is StepKind.CHILD or kind is StepKind.MAP and child_saga is not None:
            what = "child step" if kind is StepKind.CHILD else "map"
            if not isinstance(child_saga, str) or not NAME_PATTERN.match(child_saga):
                raise DefinitionError(f"{what} {name!r}: saga must be a saga name, got {child_saga!r}")
            if child_input is not None and not callable(child_input):
                raise DefinitionError(f"{what} {name!r}: input must be callable (ctx -> dict), "
                                      f"got {child_input!r}")
        elif child_saga is not None or child_input is not None:
            raise DefinitionError(f"step {name!r}: only a child step or a map names a child saga")
        if kind is StepKind.SLEEP:
            if not callable(seconds):
                check_sleep_seconds(seconds, f"sleep {name!r}")
            if timeout is not None:
                raise DefinitionError(f"sleep {name!r}: a sleep has no timeout, only its seconds")
        elif seconds is not None:
            raise DefinitionError(f"step {name!r}: only a sleep step sleeps (seconds=)")
        if compensation is not None and not callable(compensation):
            raise DefinitionError(f"step {name!r}: compensation must be callable, got {compensation!r}")
        if timeout is not None and (not _is_number(timeout) or timeout <= 0):
            raise DefinitionError(f"step {name!r}: timeout must be a number of seconds > 0, got {timeout!r}")
        for option, policy in (("retry", retry), ("compensation_retry", compensation_retry)):
            if policy is not None and not isinstance(policy, RetryPolicy):
                raise DefinitionError(f"step {name!r}: {option} must be a RetryPolicy, got {policy!r}")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise DefinitionError(f"step {name!r}: queue must be a non-empty string, got {queue!r}")
        if lease is not None and (not _is_number(lease) or lease <= 0):
            raise DefinitionError(f"step {name!r}: lease must be a number of seconds > 0, got {lease!r}")
        if compensation_timeout is not None and (not _is_number(compensation_timeout) or compensation_timeout <= 0):
            raise DefinitionError(f"step {name!r}: compensation_timeout must be a number of seconds > 0, "
                                  f"got {compensation_timeout!r}")
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                        or concurrency < 1):
            raise DefinitionError(f"step {name!r}: concurrency must be an integer >= 1, got {concurrency!r}")
        if (concurrency is not None or rate_limit is not None) and kind is not StepKind.ACTION:
            raise DefinitionError(f"step {name!r}: only an action step takes concurrency or rate_limit")
        self.name = name
        self.action = action
        self.compensate = compensation
        # Limits across every worker (store/limits.py): at most ``concurrency`` runs in this step at once,
        # at most ``rate_limit`` starts per period; a step over its limit waits ``queued``, holding no worker.
        self.concurrency = concurrency
        self.rate_limit = RateLimit.parse(rate_limit, f"step {name!r}") if rate_limit is not None else None
        self.retry = retry or DEFAULT_RETRY
        self.compensation_retry = compensation_retry or DEFAULT_COMPENSATION_RETRY
        self.timeout = timeout  # the time limit; None: SAGAFLOW_DEFAULT_STEP_TIMEOUT
        self.compensation_timeout = compensation_timeout  # the undo's own time limit; None: ``timeout``
        self.lease = lease  # how long the step counts as alive without a heartbeat; None: the time limit
        self.queue = queue
        self.best_effort = best_effort
        self.non_atomic = non_atomic
        self.pivot = pivot
        self.kind = kind
        self.signal = signal  # a gate's signal name
        self.payload_required = payload_required  # a gate's signal must carry a payload (not null)
        # A child step's saga name (its latest version when the step runs), or a map's whose items are child
        # runs (one per item).
        self.child_saga = child_saga
        # ctx -> the child's input; None: the parent's input (a map's child: {"item": item, "index": i})
        self.child_input = child_input
        self.seconds = seconds  # a sleep's duration, or ctx -> seconds (computed when the run gets there)
        self.items = items  # a map step: ctx -> the list of items (computed when the run gets there)
        self.map_concurrency = map_concurrency  # a map step: at most this many items in flight at once
        self.group: int | None = None  # Saga.parallel: the index of the group's first step
        self.saga: Saga | None = None

    @property
    def special(self) -> bool:
        """Whether the step needs more than the linear fast path (store/fastpath.py) can record."""
        return (self.kind is not StepKind.ACTION or self.best_effort or self.non_atomic or self.pivot
                or self.group is not None)

    @property
    def runs_children(self) -> bool:
        """Whether the step starts child runs (a child step, or a map whose items are child runs): its undo
        compensates them, with or without a compensation of its own."""
        return self.kind is StepKind.CHILD or self.kind is StepKind.MAP and self.child_saga is not None

    def compensation(self, fn: Action | None = None, *, retry: RetryPolicy | None = None):
        """Decorator: register ``fn`` as the compensation of this step."""

        if retry is not None and not isinstance(retry, RetryPolicy):
            raise DefinitionError(f"step {self.name!r}: compensation retry must be a RetryPolicy, got {retry!r}")

        def register(func: Action) -> Action:
            if not callable(func):
                raise DefinitionError(f"step {self.name!r}: compensation must be callable")
            if self.compensate is not None:
                raise DefinitionError(f"step {self.name!r} already has a compensation")
            self.compensate = func
            if retry is not None:
                self.compensation_retry = retry
            if self.saga is not None:
                registry.changed(self.saga)
            return func

        return register(fn) if fn is not None else register

    def __call__(self, ctx: StepContext) -> Any:
        # The decorator replaces the function by its Step; keep it callable for direct use in tests.
        if self.action is None:
            raise TypeError(f"step {self.name!r} is a {self.kind.value} step: it has no action to call")
        return self.action(ctx)

    def __repr__(self) -> str:
        return f"<Step {self.name}{' +compensation' if self.compensate else ''}>"


def Sleep(name: str, seconds: float | SleepFor, compensation: Action | None = None) -> Step:
    """A sleep step for the plain form: ``Saga(name, steps=[a, Sleep("cool_off", 3600), b])``."""
    return Step(name, None, compensation, kind=StepKind.SLEEP, seconds=seconds)


def check_map(name: str, items: Any, concurrency: Any, flagged: bool) -> None:
    """A map step's own options: ``items`` a function of the context, ``concurrency`` an integer >= 1."""
    if not callable(items):
        raise DefinitionError(f"map {name!r}: items must be callable (ctx -> list), got {items!r:.80}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise DefinitionError(f"map {name!r}: concurrency must be an integer >= 1 (items in flight at once), "
                              f"got {concurrency!r:.80}")
    if flagged:
        raise DefinitionError(f"map {name!r}: a map step cannot be best_effort or a pivot")


def Map(name: str, action: Action | None = None, items: MapItems | None = None, *, concurrency: int = 10,
        compensation: Action | None = None, child: str | None = None, input: ChildInput | None = None,
        **options: Any) -> Step:
    """A map step for the plain form: ``Saga(name, steps=[a, Map("charge", charge, lambda ctx: ...), b])``.
    With ``child="<saga>"`` instead of an action, each item runs as a child run of that saga
    (``Map("quotes", child="get_quote", items=lambda ctx: ...)``; ``input(ctx)`` builds each child's input
    from ``ctx.item`` / ``ctx.item_index``, default ``{"item": item, "index": i}``)."""
    return Step(name, action, compensation, kind=StepKind.MAP, items=items, map_concurrency=concurrency,
                child_saga=child, child_input=input, **options)


class Parallel:
    """Steps that run at the same time, for the plain form: ``Saga(name, steps=[a, Parallel(b, c), d])``."""

    def __init__(self, *steps: Step) -> None:
        if len(steps) < 2:
            raise DefinitionError("a parallel group needs at least two steps")
        self.steps = steps


class Saga:
    """A named, versioned, ordered list of steps."""

    def __init__(self, name: str, steps: Iterable[Step] = (), *, version: int = 1, register: bool = True,
                 deadline: float | None = None, max_concurrent_runs: int | None = None) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise DefinitionError(f"saga name {name!r} must be an identifier (letters, digits, underscore)")
        if not isinstance(version, int) or version < 1:
            raise DefinitionError(f"saga {name!r}: version must be an integer >= 1, got {version!r}")
        if deadline is not None and (not _is_number(deadline) or deadline <= 0):
            raise DefinitionError(f"saga {name!r}: deadline must be a number of seconds > 0, got {deadline!r}")
        if max_concurrent_runs is not None and (isinstance(max_concurrent_runs, bool)
                                                or not isinstance(max_concurrent_runs, int) or max_concurrent_runs < 1):
            raise DefinitionError(f"saga {name!r}: max_concurrent_runs must be an integer >= 1, "
                                  f"got {max_concurrent_runs!r}")
        self.name = name
        self.version = version
        # At most this many runs of the saga live at once across every worker (store/limits.py); the others
        # wait ``queued`` in the order they started. None: no limit.
        self.max_concurrent_runs = max_concurrent_runs
        # Seconds from its start a run may take (client.start(deadline=) overrides): a run still live then
        # is cancelled by the sweeper and compensates. None: no deadline.
        self.deadline = deadline
        self.steps: list[Step] = []
        self._group: int | None = None  # inside ``with saga.parallel():``
        for step in steps:
            if isinstance(step, Parallel):
                with self.parallel():
                    for branch in step.steps:
                        self._append(branch)
            else:
                self._append(step)
        if register:
            registry.add(self)

    def step(
        self,
        fn: Action | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        timeout: float | None = None,
        lease: float | None = None,
        queue: str | None = None,
        best_effort: bool = False,
        non_atomic: bool = False,
        pivot: bool = False,
        compensation_timeout: float | None = None,
        concurrency: int | None = None,
        rate_limit: str | None = None,
    ):
        """Decorator: append the function as the next step. Returns the Step (see ``Step.compensation``)."""

        def register(func: Action) -> Step:
            step = Step(
                name or func.__name__,
                func,
                retry=retry,
                compensation_retry=compensation_retry,
                timeout=timeout,
                lease=lease,
                queue=queue,
                best_effort=best_effort,
                non_atomic=non_atomic,
                pivot=pivot,
                compensation_timeout=compensation_timeout,
                concurrency=concurrency,
                rate_limit=rate_limit,
            )
            self._append(step)
            registry.changed(self)
            return step

        return register(fn) if fn is not None else register

    def gate(self, name: str, *, signal: str, timeout: float, compensation: Action | None = None,
             payload_required: bool = False) -> Step:
        """Append an approval gate: the run waits (status ``waiting``, holding no worker) until
        ``client.signal(run_id, signal, payload)`` delivers the signal; the payload becomes the step's
        result. After ``timeout`` seconds the step fails and the run is compensated. ``payload_required``: a
        signal without a payload (None) is refused with InvalidInput, changing nothing."""
        step = Step(name, None, compensation, kind=StepKind.GATE, signal=signal, timeout=timeout,
                    payload_required=payload_required)
        self._append(step)
        registry.changed(self)
        return step

    def child(self, name: str, *, saga: str, input: ChildInput | None = None,
              compensation: Action | None = None) -> Step:
        """Append a step that runs saga ``saga`` as a child run and completes when the child succeeds (its
        result: the child's step results). The child's failure is the step's failure; a later failure of
        this saga compensates the child's completed steps. ``input(ctx)`` builds the child's input
        (default: this run's input). Inside ``with saga.parallel():`` the child runs as a branch: several
        children at once, each undone if the group or a later step fails."""
        step = Step(name, None, compensation, kind=StepKind.CHILD, child_saga=saga, child_input=input)
        self._append(step)
        registry.changed(self)
        return step

    def sleep(self, name: str, seconds: float | SleepFor, *, compensation: Action | None = None) -> Step:
        """Append a durable timer: the run waits ``seconds`` (status ``waiting``, holding no worker and no
        message: the time is kept in SQL) and the sweeper moves it on when due, within one sweep interval.
        ``seconds`` may be a function of the context (``lambda ctx: ctx.input["cool_off"]``), computed when
        the run gets there. A cancel during the sleep compensates the completed steps at once."""
        step = Step(name, None, compensation, kind=StepKind.SLEEP, seconds=seconds)
        self._append(step)
        registry.changed(self)
        return step

    def map(self, fn: Action | str | None = None, *, items: MapItems, concurrency: int = 10, name: str | None = None,
            retry: RetryPolicy | None = None, compensation_retry: RetryPolicy | None = None,
            timeout: float | None = None, lease: float | None = None, queue: str | None = None,
            compensation_timeout: float | None = None, child: str | None = None, input: ChildInput | None = None,
            compensation: Action | None = None):
        """Decorator: append a map step. ``items(ctx)`` computes a list from the context (the input or an earlier
        step's result) when the run gets there; the function runs once per item (``ctx.item``,
        ``ctx.item_index``, ``ctx.idempotency_key == "<run_id>:<step>:<index>"``), at most ``concurrency`` at
        once, each item with its own retries and lease; the step's result is the list of the items' results,
        in item order. Its compensation (``@step.compensation``) runs once per completed item, with that item
        and its result. When one item fails for good, the completed items are undone, then the earlier steps.

        ``saga.map("quotes", child="get_quote", items=..., concurrency=5)`` (not a decorator: returns the step)
        runs one child run of saga ``get_quote`` per item instead of a function: its input ``input(ctx)``
        (``ctx.item``, ``ctx.item_index``; default ``{"item": item, "index": i}``), the item done when its
        child succeeds (its result: the child's step results), failed when the child ends otherwise. The
        map's undo compensates each child run that succeeded, latest first."""
        if child is not None:
            if callable(fn):
                raise DefinitionError(f"map {name or getattr(fn, '__name__', fn)!r}: a map has either an action "
                                      f"or a child saga, never both")
            step_name = fn if isinstance(fn, str) else name
            if not isinstance(step_name, str):
                raise DefinitionError(f"a map of child runs needs a name: saga.map(\"<name>\", child={child!r}, "
                                      f"items=...)")
            step = Map(step_name, None, items, concurrency=concurrency, child=child, input=input,
                       compensation=compensation, retry=retry, compensation_retry=compensation_retry,
                       timeout=timeout, lease=lease, queue=queue, compensation_timeout=compensation_timeout)
            self._append(step)
            registry.changed(self)
            return step
        if isinstance(fn, str) or input is not None or compensation is not None:
            raise DefinitionError(f"map {fn if isinstance(fn, str) else name!r}: a name, input= and compensation= "
                                  f"go with child=; a map with an action is a decorator (@saga.map(items=...)), "
                                  f"its compensation @step.compensation")

        def register(func: Action) -> Step:
            step = Map(name or func.__name__, func, items, concurrency=concurrency, retry=retry,
                       compensation_retry=compensation_retry, timeout=timeout, lease=lease, queue=queue,
                       compensation_timeout=compensation_timeout)
            self._append(step)
            registry.changed(self)
            return step

        return register(fn) if fn is not None else register

    @contextmanager
    def parallel(self):
        """Steps appended inside ``with saga.parallel():`` form one group: they run at the same time and
        are joined before the next step."""
        if self._group is not None:
            raise DefinitionError(f"saga {self.name!r}: parallel groups do not nest")
        first = self._group = len(self.steps)
        try:
            yield self
        finally:
            self._group = None
        if len([s for s in self.steps if s.group == first]) < 2:
            raise DefinitionError(f"saga {self.name!r}: a parallel group needs at least two steps")

    @property
    def linear(self) -> bool:
        """No step needs more than the linear fast path: plain actions, one after the other."""
        return not any(step.special for step in self.steps)

    def retry_policy(self, index: int) -> RetryPolicy:
        """The retry policy of step ``index``: its own, or, after a pivot, DEFAULT_FORWARD_RETRY when it set
        none (``Step.retry is DEFAULT_RETRY``: the default object itself, not an equal one given explicitly)."""
        step = self.steps[index]
        if step.retry is DEFAULT_RETRY and any(s.pivot for s in self.steps[:index]):
            return DEFAULT_FORWARD_RETRY
        return step.retry

    def check_runnable(self) -> None:
        """What can only be checked once the whole saga is written: a non-atomic step needs a compensation
        (its own undo runs when it fails), and cannot be best-effort too. Not checked as each step is appended: the
        decorator form adds the compensation afterwards (``@step.compensation``). Called by ``client.start`` and at
        worker start."""
        for step in self.steps:
            if step.non_atomic and step.best_effort:
                raise DefinitionError(
                    f"saga {self.name!r} version {self.version}, step {step.name!r}: a step cannot be both "
                    f"best_effort (its failure is never undone) and non_atomic (its failure undoes its partial "
                    f"work and the saga); choose one"
                )
            if step.non_atomic and step.compensate is None:
                raise DefinitionError(
                    f"saga {self.name!r} version {self.version}, step {step.name!r}: non_atomic=True needs a "
                    f"compensation (it undoes the step's partial work when the step fails); add one with "
                    f"@{step.name}.compensation, or drop non_atomic"
                )

    def groups(self) -> dict[int, list[int]]:
        """Each parallel group's first index -> the indexes of its steps."""
        found: dict[int, list[int]] = {}
        for index, step in enumerate(self.steps):
            if step.group is not None:
                found.setdefault(step.group, []).append(index)
        return found

    def _append(self, step: Step) -> None:
        if not isinstance(step, Step):
            raise DefinitionError(f"saga {self.name!r}: steps must be Step objects, got {step!r}")
        if any(s.name == step.name for s in self.steps):
            raise DefinitionError(f"saga {self.name!r} already has a step named {step.name!r}")
        if step.saga is not None and step.saga is not self:
            raise DefinitionError(f"step {step.name!r} already belongs to saga {step.saga.name!r}")
        if self._group is not None:
            # A child step may be a branch (its child run is the branch's work); a gate or a sleep holds the
            # whole run, and a pivot's success must not race a sibling's failure: they run alone.
            if step.kind not in (StepKind.ACTION, StepKind.CHILD) or step.pivot:
                raise DefinitionError(f"saga {self.name!r}: step {step.name!r} cannot be in a parallel group "
                                      f"(gates, sleeps, maps and pivots run alone)")
            if step.concurrency is not None or step.rate_limit is not None:
                raise DefinitionError(f"saga {self.name!r}: step {step.name!r}: a step in a parallel group takes "
                                      f"no concurrency or rate_limit (yet); limit a step before or after it")
            step.group = self._group
        step.saga = self
        self.steps.append(step)

    def __repr__(self) -> str:
        return f"<Saga {self.name} v{self.version}: {[s.name for s in self.steps]}>"


class Registry:
    """Every saga defined in this process, by name and version. Listeners hear of each change."""

    def __init__(self) -> None:
        self._sagas: dict[str, dict[int, Saga]] = {}
        self._listeners: list[Callable[[Saga], None]] = []

    def add(self, saga: Saga) -> None:
        versions = self._sagas.setdefault(saga.name, {})
        existing = versions.get(saga.version)
        if existing is not None and existing is not saga:
            raise DefinitionError(
                f"saga {saga.name!r} version {saga.version} is already registered; "
                f"bump the version to change its steps"
            )
        versions[saga.version] = saga
        self.changed(saga)

    def changed(self, saga: Saga) -> None:
        for listener in self._listeners:
            listener(saga)

    def listen(self, listener: Callable[[Saga], None]) -> None:
        """Call ``listener`` for every saga now registered and on every later change."""
        self._listeners.append(listener)
        for saga in self.all():
            listener(saga)

    def get(self, name: str, version: int | None = None) -> Saga:
        versions = self._sagas.get(name)
        if not versions:
            known = ", ".join(sorted(self._sagas)) or "none"
            raise UnknownSaga(f"unknown saga {name!r} (registered: {known})")
        if version is None:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise UnknownSaga(f"saga {name!r} has no version {version} (have {sorted(versions)})") from None

    def all(self) -> list[Saga]:
        return [versions[v] for _, versions in sorted(self._sagas.items()) for v in sorted(versions)]

    def remove(self, name: str) -> None:
        """Forget a saga (for tests that define throwaway sagas)."""
        self._sagas.pop(name, None)


registry = Registry()
