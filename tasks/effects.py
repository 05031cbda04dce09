"""What the example sagas "do" to the outside world, and the failure knobs that demos and tests use.

Every action and compensation of the examples inserts one row into ``example_effects``, unique on
(idempotency_key, kind), the way a real external API dedupes by idempotency key: a repeated call changes
nothing. So "each effect happened exactly once, in this order" can be checked in SQL.

Knobs, read from the run's input:
  fail_at: "<step>"                 that step fails with a non-retryable error (no effect)
  flaky: {"<step>": n}              the step fails n times with a retryable error, then succeeds
  fail_compensation: {"<step>": n}  the compensation fails n times (counted over all its attempts), then works
  sleep: {"<step>": seconds}        the step (and its compensation) sleeps first
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, UniqueConstraint, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from sagaflow import NonRetryableError, RetryPolicy, StepContext
from sagaflow.app import get_store

metadata = MetaData()
example_effects = Table(
    "example_effects",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("idempotency_key", String(300), nullable=False),
    Column("saga", String(200), nullable=False),
    Column("step", String(200), nullable=False),
    Column("kind", String(8), nullable=False),  # 'do' or 'undo'
    Column("run_id", String(36), nullable=False, index=True),
    Column("at", DateTime, nullable=False),
    UniqueConstraint("idempotency_key", "kind", name="uq_example_effects_key_kind"),
)


class ExampleFailure(NonRetryableError):
    """A business failure: the step fails at once and the saga compensates."""


class TransientFailure(Exception):
    """A passing fault (timeout, 503...): retried with backoff."""


STEP_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.1, backoff=2.0, max_interval=2.0)
COMPENSATION_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.1, backoff=2.0, max_interval=2.0)

_table_ready: set[str] = set()


def ensure_table() -> None:
    store = get_store()
    if store.url not in _table_ready:
        try:
            metadata.create_all(store.engine, checkfirst=True)
        except DBAPIError:
            # Another process created it between our check and our CREATE: fine if it is there now.
            if not inspect(store.engine).has_table(example_effects.name):
                raise
        _table_ready.add(store.url)


def _knob(ctx: StepContext, name: str) -> dict:
    value = ctx.input.get(name)
    return value if isinstance(value, dict) else {}


def _record(ctx: StepContext, kind: str) -> None:
    ensure_table()
    engine = get_store().engine
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    row = dict(idempotency_key=ctx.idempotency_key, saga=ctx.saga, step=ctx.step, kind=kind, run_id=ctx.run_id,
               at=datetime.now(timezone.utc).replace(tzinfo=None))
    with engine.begin() as conn:
        conn.execute(dialect.insert(example_effects).values(**row).on_conflict_do_nothing())


def _sleep(ctx: StepContext) -> None:
    delay = _knob(ctx, "sleep").get(ctx.step)
    if delay:
        time.sleep(float(delay))


def do(ctx: StepContext) -> None:
    """Apply the knobs for an action, then record its effect once."""
    _sleep(ctx)
    if ctx.input.get("fail_at") == ctx.step:
        raise ExampleFailure(f"{ctx.step} failed on purpose (fail_at)")
    if ctx.attempt <= int(_knob(ctx, "flaky").get(ctx.step, 0)):
        raise TransientFailure(f"{ctx.step}: transient fault on attempt {ctx.attempt} (flaky)")
    _record(ctx, "do")


def undo(ctx: StepContext) -> None:
    """Apply the knobs for a compensation, then record its effect once."""
    _sleep(ctx)
    if ctx.attempt <= int(_knob(ctx, "fail_compensation").get(ctx.step, 0)):
        raise TransientFailure(f"undo {ctx.step}: fault on attempt {ctx.attempt} (fail_compensation)")
    _record(ctx, "undo")


def effects_of(run_id: str) -> list[tuple[str, str]]:
    """[(kind, step), ...] in the order they happened."""
    ensure_table()
    e = example_effects.c
    with get_store().engine.connect() as conn:
        rows = conn.execute(select(e.kind, e.step).where(e.run_id == run_id).order_by(e.id))
        return [(r.kind, r.step) for r in rows]
