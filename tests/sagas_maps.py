"""Sagas for the tests of map steps (tests/integration/test_maps.py; the test worker imports this module:
SAGAFLOW_IMPORTS).

Every item's action and undo is recorded in ``test_map_effects`` with no uniqueness, so an item run or
undone twice shows twice. The input's knobs:
  items: [...]              the list the map runs over
  fail_items: [n, ...]      those items fail with a non-retryable error
  sleep_items: {"n": s}     item n sleeps s seconds first (a late item)
  sleep: s                  every item sleeps s seconds first
  flaky_items: [n, ...]     those items fail once (a transient error), then succeed
  fail_at: "<step>"         that plain step fails (after the map)

Every message a map saga's run publishes is measured (before_task_publish, in the worker and in the test
process alike): its task name and the size of its JSON body, pushed to the Redis list ``map-msg:<run_id>``
of the broker (tests only; a broker that is not Redis records nothing).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from celery.signals import before_task_publish
from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, inspect, select
from sqlalchemy.exc import DBAPIError

from sagaflow import Map, NonRetryableError, RetryPolicy, Saga, StepContext, handler
from sagaflow.app import get_settings, get_store
from sagaflow.tasks.effects import do, undo

FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=0.5)
KILL_QUEUE = "maps_kill"

metadata = MetaData()
map_effects = Table(
    "test_map_effects", metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(36), nullable=False, index=True),
    Column("step", String(200), nullable=False),
    Column("item", Integer, nullable=True),
    Column("kind", String(8), nullable=False),
    Column("key", String(300), nullable=False),
    Column("at", DateTime, nullable=False),
)
_ready: set[str] = set()


def ensure_table() -> None:
    store = get_store()
    if store.url not in _ready:
        try:
            metadata.create_all(store.engine, checkfirst=True)
        except DBAPIError:
            if not inspect(store.engine).has_table(map_effects.name):
                raise
        _ready.add(store.url)


def record(ctx: StepContext, kind: str) -> None:
    ensure_table()
    with get_store().engine.begin() as conn:
        conn.execute(map_effects.insert().values(
            run_id=ctx.run_id, step=ctx.step, item=ctx.item_index, kind=kind, key=ctx.idempotency_key,
            at=datetime.now(timezone.utc).replace(tzinfo=None)))


def effects(run_id: str) -> list[tuple[str, str, int | None]]:
    """(kind, step, item) in the order they happened."""
    ensure_table()
    e = map_effects.c
    with get_store().engine.connect() as conn:
        return [(r.kind, r.step, r.item) for r in
                conn.execute(select(e.kind, e.step, e.item).where(e.run_id == run_id).order_by(e.id))]


def keys(run_id: str) -> list[str]:
    ensure_table()
    e = map_effects.c
    with get_store().engine.connect() as conn:
        return [r.key for r in conn.execute(select(e.key).where(e.run_id == run_id, e.kind == "do"))]


def _item_action(ctx: StepContext):
    knobs = ctx.input
    delay = (knobs.get("sleep_items") or {}).get(str(ctx.item_index), knobs.get("sleep"))
    if delay:
        time.sleep(float(delay))
    if ctx.item_index in knobs.get("fail_items", ()):
        raise NonRetryableError(f"item {ctx.item_index} failed on purpose")
    if ctx.item_index in knobs.get("flaky_items", ()) and ctx.attempt == 1:
        raise RuntimeError(f"item {ctx.item_index}: transient fault")
    record(ctx, "do")
    return {"item": ctx.item, "doubled": ctx.item * 2 if isinstance(ctx.item, int) else None}


def _item_undo(ctx: StepContext):
    assert ctx.result is not None and ctx.result["item"] == ctx.item  # the item and its own result
    record(ctx, "undo")


# map_orders: reserve -> charge (a map over input.items, 5 at once) -> confirm
map_orders = Saga("map_orders")


@map_orders.step(retry=FAST, compensation_retry=FAST)
def reserve(ctx: StepContext):
    do(ctx)
    return {"reserved": len(ctx.input.get("items", []))}


@reserve.compensation
def unreserve(ctx: StepContext):
    undo(ctx)


@map_orders.map(items=lambda ctx: ctx.input["items"], concurrency=5, retry=FAST, compensation_retry=FAST)
def charge(ctx: StepContext):
    return _item_action(ctx)


@charge.compensation
def refund(ctx: StepContext):
    _item_undo(ctx)


@map_orders.step(retry=FAST, compensation_retry=FAST)
def confirm(ctx: StepContext):
    do(ctx)
    return {"charged": len(ctx.results["charge"])}


# map_noop: a map over a long list of no-op items, then a step that checks the results arrived in order.
def _noop(ctx: StepContext):
    return None


def _count(ctx: StepContext):
    results = ctx.results["each"]
    if len(results) != len(ctx.input["items"]):
        raise NonRetryableError(f"{len(results)} results for {len(ctx.input['items'])} items")
    return {"count": len(results)}


map_noop = Saga("map_noop", steps=[Map("each", _noop, lambda ctx: ctx.input["items"], concurrency=20)])
map_noop.step(_count, name="count")

# map_from_result: the list comes from an earlier step's result; items that are not a list are refused.
map_from_result = Saga("map_from_result")


@map_from_result.step
def plan(ctx: StepContext):
    return {"ids": ctx.input.get("ids")}


@map_from_result.map(items=lambda ctx: ctx.results["plan"]["ids"], concurrency=2, retry=FAST)
def visit(ctx: StepContext):
    return _item_action(ctx)


# map_kill: a map on its own queue with a short lease, for the worker-kill test.
map_kill = Saga("map_kill")


@map_kill.map(items=lambda ctx: ctx.input["items"], concurrency=4, retry=FAST, lease=4, queue=KILL_QUEUE)
def slow(ctx: StepContext):
    return _item_action(ctx)


# The handlers of tests/sagas_maps.yaml (map_yaml): the same map, written in YAML.
@handler("map_test_plan")
def _yaml_plan(ctx: StepContext):
    return {"ids": ctx.input.get("ids")}


@handler("map_kids_total")
def _kids_total(ctx: StepContext):
    """map_kids_yaml: what the step after a map of child runs receives (each child's results, in item order)."""
    return {"inputs": [r["c_reserve"]["input"] for r in ctx.results["quotes"]],
            "charged": [r["c_charge"]["charged"] for r in ctx.results["quotes"]]}


handler("map_test_item")(_item_action)
handler("map_test_undo")(_item_undo)

MEASURED = {"map_orders", "map_noop", "map_from_result", "map_kill"}


@before_task_publish.connect
def _measure(sender=None, body=None, headers=None, **_):
    """Record the size of each message of a map saga's run (tests only)."""
    try:
        name = (headers or {}).get("task") or sender or ""
        if name.split(".", 1)[0] not in MEASURED:
            return
        args, kwargs = (body[0], body[1]) if isinstance(body, (tuple, list)) and len(body) >= 2 else ((), {})
        run_id = kwargs.get("run_id") or (args[0] if args and isinstance(args[0], str) else None)
        url = get_settings().broker_url
        if run_id is None or not url.startswith("redis"):
            return
        size = len(json.dumps(body, default=str))
        _redis(url).rpush(f"map-msg:{run_id}", f"{name} {size}")
    except Exception:  # noqa: BLE001 - a measurement never breaks a publish
        pass


_clients: dict = {}


def _redis(url: str):
    import redis

    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


def message_sizes(run_id: str) -> list[tuple[str, int]]:
    raw = _redis(get_settings().broker_url).lrange(f"map-msg:{run_id}", 0, -1)
    return [(name, int(size)) for name, size in (entry.decode().rsplit(" ", 1) for entry in raw)]
