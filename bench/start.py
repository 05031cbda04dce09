"""python -m bench.start: what starting a run costs the caller, against a plain ``apply_async`` of the same
4-task chain, in one process and one run.

No worker runs: the messages wait in the bench's own Redis db, which is flushed at the end (and the bench's
own database is dropped). Each round times ``--runs`` starts of each kind, the kinds taking turns so a
change in the machine's load hits them alike; the figure is the median of the rounds, in ms per run:

  plain        bench.plain.build_chain(...).apply_async(): a 4-task chain, Celery's defaults + acks_late
  start        SagaClient.start("bench_w1", ...): 4 no-op steps on PostgreSQL
  start_key    the same with an idempotency key
  start_deadline  the same with deadline=60
  start_delayed   the same with delay=3600 (status scheduled: nothing is published)
  start_many   SagaClient.start_many("bench_w1", [...]) of --runs inputs, per run

``--profile FILE``: cProfile of the ``start`` rounds, the top functions by cumulative time written to FILE.
``--sql``: also count SQL round trips per start (SQLAlchemy's before_cursor_execute, plus the fast path's
prepared statements) and Redis commands per start.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import uuid

from bench.services import check_services, drop_database, fresh_database

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="starts of each kind per round (default 200)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the figure is their median (default 7)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="the bench's own Redis db; flushed")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--database", default="bench_start", help="dropped and created, dropped at the end")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the start rounds; the summary goes here")
    parser.add_argument("--sql", action="store_true", help="count SQL round trips and Redis commands per start")
    parser.add_argument("--kinds", default="plain,start,start_key,start_deadline,start_delayed,start_many")
    args = parser.parse_args(argv)

    import redis

    check_services(args.redis_url, args.pg_admin_url)
    os.environ["BENCH_REDIS_URL"] = args.redis_url
    url = fresh_database(args.pg_admin_url, args.database)
    try:
        return _measure(args, url, redis.Redis.from_url(args.redis_url))
    finally:
        redis.Redis.from_url(args.redis_url).flushdb()
        from sagaflow.app import get_store

        get_store().dispose()
        drop_database(args.pg_admin_url, args.database)


def _measure(args, url: str, r) -> int:
    from sagaflow.app import configure
    from sagaflow.client import SagaClient
    from sagaflow.config.settings import Settings
    from sagaflow.store.migrate import upgrade

    upgrade(url)
    configure(Settings.from_env({"SAGAFLOW_DATABASE_URL": url, "SAGAFLOW_BROKER_URL": args.redis_url,
                                 "SAGAFLOW_IMPORTS": "bench.sagas", "SAGAFLOW_LOG_LEVEL": "WARNING"}))
    import bench.sagas  # noqa: F401  the definitions start needs
    from bench import plain

    plain.configure(args.redis_url)
    client = SagaClient()  # on the settings configured above (from_env would read the environment)
    r.flushdb()
    kinds = args.kinds.split(",")
    tag = uuid.uuid4().hex[:8]

    def run_plain(n: int) -> None:
        for i in range(n):
            plain.build_chain(f"{tag}-{i}-{uuid.uuid4()}", 4, "start").apply_async()

    def run_start(n: int) -> None:
        for i in range(n):
            client.start("bench_w1", {"i": i})

    def run_start_key(n: int) -> None:
        for i in range(n):
            client.start("bench_w1", {"i": i}, idempotency_key=str(uuid.uuid4()))

    def run_start_deadline(n: int) -> None:
        for i in range(n):
            client.start("bench_w1", {"i": i}, deadline=60)

    def run_start_delayed(n: int) -> None:
        for i in range(n):
            client.start("bench_w1", {"i": i}, delay=3600)

    def run_start_many(n: int) -> None:
        client.start_many("bench_w1", [{"i": i} for i in range(n)])

    runners = {"plain": run_plain, "start": run_start, "start_key": run_start_key,
               "start_deadline": run_start_deadline, "start_delayed": run_start_delayed,
               "start_many": run_start_many}
    for kind in kinds:  # warm up: connections, prepared statements, imports
        runners[kind](20)
    if args.sql:
        _count(client, runners, kinds, r)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(args.rounds):
        for kind in kinds:
            if profiler is not None and kind == "start":
                profiler.enable()
            t0 = time.perf_counter()
            runners[kind](args.runs)
            times[kind].append((time.perf_counter() - t0) / args.runs * 1000)
            if profiler is not None and kind == "start":
                profiler.disable()
        r.flushdb()  # no worker: keep the queue short
    load = os.getloadavg()
    print(f"# {args.rounds} rounds x {args.runs} starts of each kind; load average {load[0]:.2f} "
          f"on {os.cpu_count()} cores (a shared machine: figures move with the load)")
    print(f"{'kind':<16}{'median ms/run':>15}{'min':>8}{'max':>8}{'x plain':>9}")
    base = statistics.median(times["plain"]) if "plain" in times else None
    for kind in kinds:
        median = statistics.median(times[kind])
        ratio = f"{median / base:.2f}" if base else "-"
        print(f"{kind:<16}{median:>15.3f}{min(times[kind]):>8.3f}{max(times[kind]):>8.3f}{ratio:>9}")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(45)
        with open(args.profile, "w") as f:
            f.write(out.getvalue())
        print(f"# profile of the start rounds: {args.profile}")
    return 0


def _count(client, runners, kinds, r) -> None:
    """SQL round trips and Redis commands per run of each kind, over 50 runs."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from sagaflow.store import fastpath

    counts = {"sql": 0}

    def statement(*_a, **_k):
        counts["sql"] += 1

    event.listen(Engine, "before_cursor_execute", statement)
    fastpath.STATEMENT_HOOKS.append(lambda _engine: statement())
    n = 50
    try:
        for kind in kinds:
            counts["sql"] = 0
            before = int(r.info("stats")["total_commands_processed"])
            runners[kind](n)
            redis_commands = int(r.info("stats")["total_commands_processed"]) - before - 1
            print(f"# {kind}: {counts['sql'] / n:.2f} SQL statements per run, "
                  f"{redis_commands / n:.2f} Redis commands per run (whole server, others' included)")
    finally:
        event.remove(Engine, "before_cursor_execute", statement)
        fastpath.STATEMENT_HOOKS.pop()


if __name__ == "__main__":
    sys.exit(main())
