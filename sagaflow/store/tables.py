"""The three tables: runs, their steps, and the event history. Created by the Alembic migrations in
``migrations/``; this module is what the code reads and writes through (and what autogenerate compares)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)

metadata = MetaData()


class UTCDateTime(TypeDecorator):
    """Naive UTC in the database (SQLite has no time zones), aware UTC in Python."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=dt.timezone.utc) if value is not None else None


# BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements).
BigId = BigInteger().with_variant(Integer(), "sqlite")

runs = Table(
    "saga_runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("saga", String(200), nullable=False),
    Column("saga_version", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("input", JSON, nullable=False),
    Column("idempotency_key", String(200), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    # "saga", or "plain" when policy switched compensation off for this run: no step rows, no events.
    Column("mode", String(16), nullable=False, server_default="saga"),
    # A child run (a parent's child step): the parent run and the index of that step.
    Column("parent_run_id", String(36), nullable=True),
    Column("parent_step", Integer, nullable=True),
    # A child run of a map step's item (a map whose items are child runs): the item's index in the list.
    Column("parent_item", Integer, nullable=True),
    # A run started by client.restart: the final run it restarts (that run has a run_restarted event).
    Column("restarted_from", String(36), nullable=True),
    # The run's deadline (Saga(deadline=) or start(deadline=)): the sweeper cancels it if still live then.
    Column("deadline_at", UTCDateTime, nullable=True),
    # A delayed start (status scheduled): when the sweeper publishes its first step (store/timers.py).
    Column("start_at", UTCDateTime, nullable=True),
    # client.start(priority=0..9): what the sweeper and an operator publish for the run goes at it too.
    Column("priority", Integer, nullable=False, server_default="0"),
    Index("ix_saga_runs_idempotency_key", "idempotency_key", unique=True),
    Index("ix_saga_runs_status_created", "status", "created_at"),
    Index("ix_saga_runs_saga_created", "saga", "created_at"),
    Index("ix_saga_runs_created", "created_at"),
    Index("ix_saga_runs_parent", "parent_run_id"),
    Index("ix_saga_runs_restarted_from", "restarted_from"),
    Index("ix_saga_runs_deadline", "deadline_at"),
    Index("ix_saga_runs_start_at", "start_at"),
    # On PostgreSQL also ix_saga_runs_input, GIN on (input::jsonb) jsonb_path_ops (migration 0004): an
    # expression index SQLite cannot build, so it lives in the migration only (store/search.py uses it).
)

steps = Table(
    "saga_steps",
    metadata,
    Column("run_id", String(36), ForeignKey("saga_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    Column("has_compensation", Boolean, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("compensation_attempts", Integer, nullable=False, default=0),  # all rounds: ctx.attempt
    Column("compensation_round_attempts", Integer, nullable=False, default=0),  # this round: the retry policy
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("compensation_error", Text, nullable=True),
    Column("task_id", String(255), nullable=True),
    Column("compensation_task_id", String(255), nullable=True),
    # "<celery task id>:<retries>" of the delivery that holds the step. A later retry of the same task
    # takes it over; another delivery is a duplicate unless the lease (holder alive until) expired.
    Column("claim", String(300), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("compensated_at", UTCDateTime, nullable=True),
    # The first claim of this compensation round (the duration histogram measures from it).
    Column("compensation_started_at", UTCDateTime, nullable=True),
    # What the definition said of the step when the run started (definition.Step), so SQL alone decides.
    Column("kind", String(16), nullable=False, server_default="action"),  # action | gate | child | sleep
    Column("best_effort", Boolean, nullable=False, server_default=false()),
    Column("non_atomic", Boolean, nullable=False, server_default=false()),
    Column("pivot", Boolean, nullable=False, server_default=false()),
    Column("branch_group", Integer, nullable=True),  # a parallel group: the index of its first step
    Column("signal", String(200), nullable=True),  # a gate: the signal it waits for
    # A waiting gate: when it times out; a sleep, or a step waiting out a long retry delay: when it wakes.
    Column("deadline_at", UTCDateTime, nullable=True),
    Column("child_run_id", String(36), nullable=True),  # a child step: the child run
    # The worker (main process, saga_workers.id) whose pool holds the claim: when it stops heartbeating,
    # the sweeper takes the claim back at once, whatever the lease (store/workers.py).
    Column("worker", String(200), nullable=True),
)

events = Table(
    "saga_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("saga_runs.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("step", String(200), nullable=True),
    Column("at", UTCDateTime, nullable=False),
    Column("detail", JSON, nullable=True),
    Index("ix_saga_events_run_id", "run_id", "id"),
)

# Signals delivered to a run (client.signal), kept whether or not a gate waits for them yet: a signal that
# arrives before the run reaches its gate is taken when it does. One per name and run.
signals = Table(
    "saga_signals",
    metadata,
    Column("run_id", String(36), ForeignKey("saga_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("payload", JSON, nullable=True),
    Column("received_at", UTCDateTime, nullable=False),
)

# The web app's operator logins (web/security.py): one row per login, deleted at logout, so a copied cookie
# dies with the session. The cookie carries the id and an HMAC of it keyed by the API token.
# The metrics (store/counters.py): every transition appends what it changes to saga_counter_log, in the
# same statement or transaction as the transition itself (insert-only: no row is shared between workers, so
# nothing waits on a lock); the sweeper moves the log into saga_counters, one row per series, in one
# statement. A scrape sums both tables, which stay small whatever the number of runs.
# metric: started | live | finished | step | run_duration | step_duration | compensation_duration;
# outcome: a run status, an event kind or succeeded/failed; label: "" for a counter or gauge, "le=<bound>"
# (one bucket, not cumulative) or "sum_us" (integer microseconds) for a histogram.

counters = Table(
    "saga_counters",
    metadata,
    Column("metric", String(40), primary_key=True),
    Column("saga", String(200), primary_key=True),
    Column("step", String(200), primary_key=True),
    Column("outcome", String(64), primary_key=True),
    Column("label", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

counter_log = Table(
    "saga_counter_log",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("metric", String(40), nullable=False),
    Column("saga", String(200), nullable=False),
    Column("step", String(200), nullable=False),
    Column("outcome", String(64), nullable=False),
    Column("label", String(64), nullable=False),
    Column("value", BigInteger, nullable=False),
)

operator_sessions = Table(
    "saga_operator_sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Index("ix_saga_operator_sessions_expires", "expires_at"),
)

# Failed logins and wrong bearer tokens per client address, in SQL so every web process counts the same:
# a fixed window that starts at the first failure (web/security.py throttles past a number per window).
auth_failures = Table(
    "saga_auth_failures",
    metadata,
    Column("client", String(100), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_start", UTCDateTime, nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
)

# Worker liveness (store/workers.py): one row per running worker main process, its heartbeat moved every few
# seconds; a clean stop deletes it. A claim naming a worker whose heartbeat is older than
# SAGAFLOW_WORKER_DEAD_AFTER (or that has no row) is taken back by the sweeper at once.
workers = Table(
    "saga_workers",
    metadata,
    Column("id", String(200), primary_key=True),  # "<node name>:<pid>"
    Column("hostname", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", String(1000), nullable=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
)

# Leases that one process at a time holds across the deployment: "sweeper" (the recovery sweep that every
# worker offers to run; the holder sweeps, the others skip).
leases = Table(
    "saga_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

# Schedules (store/schedules.py): a saga started on each tick of a cron expression (UTC) by the sweeper.
# next_fire_at is the first tick not fired yet; a sweep moves it with a compare-and-set after starting the
# due ticks' runs (each idempotent on "schedule:<name>:<tick>"), so many sweepers start one run per tick.
schedules = Table(
    "saga_schedules",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("saga", String(200), nullable=False),
    Column("cron", String(200), nullable=False),
    Column("input", JSON, nullable=False),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("catchup", String(16), nullable=False, server_default="skip"),  # skip | once (model/schedule.py)
    Column("next_fire_at", UTCDateTime, nullable=False),
    Column("last_fired_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_saga_schedules_due", "paused", "next_fire_at"),
)

# Limits across every worker (store/limits.py). A slot is one row: a run of a saga with max_concurrent_runs
# (idx -1, alive while the run is live) or a step with a concurrency (alive while its lease runs and its worker
# heartbeats). A run or step over its limit waits in saga_slot_waiters, served in arrival order (id).
slots = Table(
    "saga_slots",
    metadata,
    Column("key", String(300), primary_key=True),  # "run:<saga>" or "step:<saga>.<step>"
    Column("run_id", String(36), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("worker", String(200), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
)

slot_waiters = Table(
    "saga_slot_waiters",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(300), nullable=False),
    Column("run_id", String(36), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("saga", String(200), nullable=False),
    Column("saga_version", Integer, nullable=False),
    Column("queued_at", UTCDateTime, nullable=False),
    UniqueConstraint("key", "run_id", "idx", name="uq_saga_slot_waiters"),
    Index("ix_saga_slot_waiters_key", "key", "id"),
    Index("ix_saga_slot_waiters_run", "run_id"),
)

# A step's rate_limit: the starts of the last period, per key (older rows are deleted as new ones come).
rate_starts = Table(
    "saga_rate_starts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(300), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_saga_rate_starts_key_at", "key", "at"),
)

# A map step's items (store/maps.py): one row per item of the list its ``items`` computed, in list order.
# status: pending (not yet handed out) -> dispatched (its message published: the window) -> running (a
# delivery holds it, under its lease) -> succeeded | failed (for good) | skipped (the map failed or was
# cancelled before it ran) ; succeeded -> compensated (its undo done, once).
map_items = Table(
    "saga_map_items",
    metadata,
    Column("run_id", String(36), ForeignKey("saga_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),  # the map step's index
    Column("item", Integer, primary_key=True),  # the item's index in the list
    Column("status", String(16), nullable=False),
    Column("value", JSON, nullable=True),  # the item itself
    Column("result", JSON, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("claim", String(300), nullable=True),  # the delivery that holds it (as saga_steps.claim)
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("error", Text, nullable=True),
    Column("dispatched_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    # A map whose items are child runs: the item's child run (its undo compensates that run).
    Column("child_run_id", String(36), nullable=True),
)
# (run, step, status, item): the window's next items in order, and "is any item failed/in flight", by index.
Index("ix_saga_map_items_status", map_items.c.run_id, map_items.c.idx, map_items.c.status, map_items.c.item)
