"""The sql phase: the SQL round trips and statements of W1 and W2 runs, counted in a worker that imports
bench/sqlcount.py, on the wire through bench/pgwire.py, and on the client's side of each start (LocalCounter)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from bench.figures import Figure, Target, progress
from bench.services import ROOT, free_port

if TYPE_CHECKING:
    from bench.core import Bench

SQL_KEY = "bench:sql"  # bench/sqlcount.py writes the workers' counts here


class LocalCounter:
    """bench/sqlcount.py's counting, in this process, for the store's engines: the client's side of each
    start. As there, no BEGIN, COMMIT or ROLLBACK is counted on an autocommit connection."""

    def __init__(self, *engines) -> None:
        from bench.sqlcount import _autocommit

        self.counts: Counter = Counter()
        self._listeners = []
        self._engines = [e for e in engines if e is not None]
        for engine in engines:
            if engine is None:
                continue
            self._listeners += [
                (engine, "before_cursor_execute", lambda *a, **k: self._add("statement")),
                (engine, "begin", lambda conn: _autocommit(conn) or self._add("begin")),
                (engine, "commit", lambda conn: _autocommit(conn) or self._add("commit")),
                (engine, "rollback", lambda conn: _autocommit(conn) or self._add("rollback")),
                (engine.pool, "checkout", self._checkout),
                (engine.pool, "connect", self._connect),
            ]

    def _add(self, kind: str) -> None:
        self.counts[kind] += 1

    def _fast_statement(self, engine) -> None:  # the fast path's statements skip the events above
        if engine in self._engines:
            self._add("statement")

    def _checkout(self, dbapi_connection, record, proxy) -> None:  # as bench/sqlcount.py
        self._add("checkout")
        if proxy._pool._pre_ping and not record.info.pop("bench_fresh", False):
            self._add("ping")

    def _connect(self, dbapi_connection, record) -> None:
        record.info["bench_fresh"] = True
        self._add("connect")

    def __enter__(self) -> "LocalCounter":
        from sqlalchemy import event

        from sagaflow.store import fastpath

        for target, name, fn in self._listeners:
            event.listen(target, name, fn)
        fastpath.STATEMENT_HOOKS.append(self._fast_statement)
        return self

    def __exit__(self, *exc) -> None:
        from sqlalchemy import event

        from sagaflow.store import fastpath

        for target, name, fn in self._listeners:
            event.remove(target, name, fn)
        fastpath.STATEMENT_HOOKS.remove(self._fast_statement)


def counted_batch(bench: Bench, side, n: int, fail_at: int | None, what: str,
                  wire_file: Path | None = None) -> tuple[dict, Counter, bool, dict | None]:
    """A warm-up, then n runs at once with their SQL counted, in the counting worker (already started):
    the worker's counts (bench/sqlcount.py, through the bench's Redis), the client's (LocalCounter), whether
    every run ended as it should and, with wire_file, what bench/pgwire.py saw on the wire: its
    ``round_trips``, and among them the ``no_flush_wait`` commits (not waiting for the WAL flush)."""
    import redis

    from bench.pgwire import read_counts
    from sagaflow.app import get_store

    r = redis.Redis.from_url(bench.args.redis_url, decode_responses=True)
    store = get_store()
    bench.warm_up(side, 4, fail_at)
    time.sleep(0.6)  # the last task's counts are flushed after it commits; the proxy's every 0.2 s
    r.delete(SQL_KEY)
    wire_before = read_counts(wire_file) if wire_file else None
    with LocalCounter(store.engine, store.autocommit) as client_counts:
        outcome = bench.batch(side, n, 4, fail_at, what, quiet=True)
    time.sleep(0.6)
    wire = None
    if wire_file:
        wire_after = read_counts(wire_file)
        wire = {"round_trips": sum(wire_after[k] - wire_before[k] for k in ("query", "sync")),
                "no_flush_wait": wire_after.get("no_flush_wait", 0) - wire_before.get("no_flush_wait", 0),
                "fast": wire_after.get("fast", 0) - wire_before.get("fast", 0),
                "others": {k: v - wire_before["others"].get(k, 0) for k, v in wire_after["others"].items()
                           if v != wire_before["others"].get(k, 0)}}
    counts = {k: int(v) for k, v in r.hgetall(SQL_KEY).items()}
    side.reset()
    return counts, client_counts.counts, outcome["ok"], wire


def phase_sql(bench: Bench) -> None:
    """Count the worker's SQL in a worker that imports bench.sqlcount (and only here: the listeners
    cost a little), and the client's SQL of each start in this process. The counting worker reaches
    PostgreSQL through bench/pgwire.py, which counts the same round trips on the wire."""
    from sqlalchemy.engine import make_url

    n = bench.sizes.sql
    progress(f"sql: counting the SQL of {n} W1 runs and {n} W2 runs")
    bench.stop_worker("sagaflow")
    url = make_url(bench.database_url)
    wire_file = bench.workdir / "pgwire-counts.json"
    wire_file.unlink(missing_ok=True)
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "bench.pgwire", str(port), url.host or "127.0.0.1",
                              str(url.port or 5432), str(wire_file)], cwd=ROOT)
    deadline = time.monotonic() + 10
    while not wire_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proxied = url.set(host="127.0.0.1", port=port, query={**url.query, "sslmode": "disable"})
    results = {}
    try:
        bench.start_sagaflow_worker("counting", "bench.sagas,bench.sqlcount",
                                   proxied.render_as_string(hide_password=False))
        for workload, fail_at in (("w1", None), ("w2", 3)):
            results[workload] = counted_batch(bench, bench.sf, n, fail_at, f"{workload} SQL count", wire_file)
    finally:
        bench.stop_worker("counting")  # the last phase that needs a worker (see run)
        proxy.terminate()
        proxy.wait(10)

    def totals(counts: dict, prefix: str = "") -> dict:
        t = {k: counts.get(prefix + k, 0) for k in ("statement", "begin", "commit", "rollback")}
        t["ping"] = counts.get(prefix + "ping", 0)
        t["round_trips"] = sum(t.values())
        return t

    w1_counts, w1_client, w1_ok, w1_wire = results["w1"]
    assert w1_wire is not None  # counted through the proxy (wire_file)
    w1 = totals(w1_counts)
    tasks = sorted({k.split("|")[0] for k in w1_counts if "|" in k})
    by_task = {task: totals(w1_counts, task + "|") for task in tasks}
    steps = n * 4
    # The worker's timers (its liveness heartbeat, the sweeper's lease) query PostgreSQL too, whenever they are
    # due: counted on the wire, apart, and not per step.
    timers = w1_wire["round_trips"] - w1_wire["fast"]
    bench.add(Figure(
        "sql_round_trips_per_step", "SQL round trips per step, W1 success path (worker, on the wire)",
        "round trips", w1_wire["fast"] / steps, target=Target("sagaflow", "<=", 1), checked=w1_ok, n=n,
        extra={"counted": "queries sent to PostgreSQL through bench/pgwire.py that execute the fast path's "
                          "prepared statements; the run's finish is included, spread over its steps",
               "all_queries_on_the_wire": w1_wire["round_trips"], "outside_the_steps": timers,
               "outside_the_steps_were": w1_wire["others"],
               "agrees_with_listeners": w1_wire["fast"] == w1["round_trips"]},
    ))
    bench.add(Figure(
        "sql_durable_commits_per_step", "of which commits that wait for the WAL flush (on the wire)", "commits",
        (w1_wire["fast"] - w1_wire["no_flush_wait"]) / steps, target=Target("sagaflow", "<=", 1),
        checked=w1_ok, n=n,
        extra={"counted": "those round trips minus the claims sent with SET LOCAL synchronous_commit = off "
                          "(store/fastpath.py); every hot-path statement commits (autocommit)",
               "no_flush_wait": w1_wire["no_flush_wait"]},
    ))
    if timers:
        bench.add(Figure(
            "sql_round_trips_outside_steps", "queries on the wire outside the steps during the W1 count (timers)",
            "round trips", timers, checked=w1_ok, n=n, extra={"were": w1_wire["others"]},
        ))
    bench.add(Figure(
        "sql_round_trips_per_step_listeners", "the same, counted by SQLAlchemy listeners", "round trips",
        w1["round_trips"] / steps, checked=w1_ok, n=n,
        extra={"totals": w1, "by_task_per_run": {t: {k: v / n for k, v in c.items()} for t, c in by_task.items()},
               "counted": "statements + BEGIN + COMMIT + ROLLBACK (not on autocommit connections) + "
                          "pre-ping SELECT 1"},
    ))
    bench.add(Figure(
        "sql_statements_per_step", "SQL statements per step, W1 success path (worker)", "statements",
        w1["statement"] / steps, checked=w1_ok, n=n,
    ))
    client = totals(w1_client)
    bench.add(Figure(
        "sql_round_trips_per_start", "SQL round trips per SagaClient.start (client)", "round trips",
        client["round_trips"] / n, checked=w1_ok, n=n, extra={"totals": client},
    ))
    w2_counts, _, w2_ok, w2_wire = results["w2"]
    assert w2_wire is not None
    w2 = totals(w2_counts)
    bench.add(Figure(
        "w2_sql_round_trips_per_run",
        "SQL round trips per W2 run: 4 steps (the 4th failing begins the undos), 3 undos (worker)",
        "round trips", w2_wire["fast"] / n, checked=w2_ok, n=n,
        extra={"totals_by_listeners": w2, "on_the_wire": w2_wire,
               "outside_the_steps": w2_wire["round_trips"] - w2_wire["fast"]},
    ))
