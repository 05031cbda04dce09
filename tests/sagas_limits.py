"""The sagas of the limits tests (tests/integration/test_limits.py): their limited steps run on their own
queue (``limits``), consumed by the test's own workers; each action records when it ran in
``limit_intervals`` (wall clock, one machine), so the tests can count how many ran at once."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, select

from sagaflow import RetryPolicy, Saga, StepContext
from sagaflow.app import get_store

QUEUE = "limits"
FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=1.0)

metadata = MetaData()
intervals = Table(
    "limit_intervals",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("saga", String(200), nullable=False),
    Column("run_id", String(36), nullable=False),
    Column("began", Float, nullable=False),
    Column("ended", Float, nullable=True),
)


def ensure_table() -> None:
    metadata.create_all(get_store().engine, checkfirst=True)


def _work(ctx: StepContext) -> dict:
    """Record the start, sleep ``ctx.input["sleep"]`` seconds, record the end."""
    began = time.time()
    engine = get_store().engine
    with engine.begin() as conn:
        row_id = conn.execute(intervals.insert().values(saga=ctx.saga, run_id=ctx.run_id, began=began)
                              .returning(intervals.c.id)).scalar_one()
    time.sleep(float(ctx.input.get("sleep", 0)))
    with engine.begin() as conn:
        conn.execute(intervals.update().where(intervals.c.id == row_id).values(ended=time.time()))
    return {"began": began, "at": datetime.now(timezone.utc).isoformat()}


def recorded(saga: str) -> list[tuple[str, float, float | None]]:
    """(run id, began, ended) of every action of ``saga``, by start."""
    c = intervals.c
    with get_store().engine.connect() as conn:
        rows = conn.execute(select(c.run_id, c.began, c.ended).where(c.saga == saga).order_by(c.began))
        return [(r.run_id, r.began, r.ended) for r in rows]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end and a start at the same instant do not overlap)."""
    points = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
    most = now = 0
    for _, delta in points:
        now += delta
        most = max(most, now)
    return most


# 40 runs through a step that may run 3 at a time across every worker.
concurrent = Saga("limit_concurrency")


@concurrent.step(retry=FAST)
def prepare(ctx: StepContext):
    return {"ready": True}


@concurrent.step(retry=FAST, queue=QUEUE, concurrency=3)
def call_provider(ctx: StepContext):
    return _work(ctx)


# A provider that takes 5 calls per second across every worker.
rated = Saga("limit_rate")


@rated.step(retry=FAST, queue=QUEUE, rate_limit="5/s")
def call_rated(ctx: StepContext):
    return _work(ctx)


# At most two runs live at once.
two_at_a_time = Saga("limit_runs", max_concurrent_runs=2)


@two_at_a_time.step(retry=FAST, queue=QUEUE)
def hold(ctx: StepContext):
    return _work(ctx)


@hold.compensation
def release(ctx: StepContext):
    pass


@two_at_a_time.step(retry=FAST, queue=QUEUE)
def finish(ctx: StepContext):
    return {"finished": True}


# One at a time, for the killed-holder test: on a queue of its own, so the test decides which worker holds it.
SOLO_QUEUE = "limits_solo"
solo = Saga("limit_solo")


@solo.step(retry=FAST, queue=SOLO_QUEUE, concurrency=1)
def alone(ctx: StepContext):
    return _work(ctx)


# Priorities under a backlog (tests/integration/test_limits.py): two steps, each message at the run's priority.
PRIO_QUEUE = "limits_prio"
prioritized = Saga("limit_priority")


@prioritized.step(retry=FAST, queue=PRIO_QUEUE)
def first_half(ctx: StepContext):
    return {"priority": ctx.input.get("p")}


@prioritized.step(retry=FAST, queue=PRIO_QUEUE)
def second_half(ctx: StepContext):
    return {"priority": ctx.input.get("p")}
