"""Search and /metrics at a million runs (issue 16): fill the bench's own PostgreSQL database with N runs
in a few set-based INSERTs (``generate_series``), then time the searches the operator makes (through
``SagaClient.list``, the code the API and the CLI call) and a /metrics scrape (through the Flask app).

    python -m bench.million --runs 1000000          # ~ a few minutes to fill on a small machine
    python -m bench.million --runs 1000 --keep       # compare; --keep leaves the database for a look

Each run has 2 step rows and 4 events (started, 2 steps succeeded, ended), 20 statuses cycle (mostly
succeeded), 10 sagas, 50,000 customers; a timing is the median of ``--repeat`` calls after one warm-up.
The counters of /metrics (store/counters.py) are seeded from the rows once after the fill, as migration 0006
does for an upgraded database; a page's ``total_is_exact`` is printed with each search.
Prints one JSON line per figure. Uses PostgreSQL at SAGAFLOW_BENCH_PG (default the local server) and a
database of its own (sagaflow_bench_million), dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

from sqlalchemy import create_engine, text

from bench.services import drop_database, fresh_database

DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DATABASE = "sagaflow_bench_million"

FILL = [
    # the GIN index is built once after the rows are in (as after a bulk load), not row by row
    "DROP INDEX IF EXISTS ix_saga_runs_input",
    """
    INSERT INTO saga_runs (id, saga, saga_version, status, input, idempotency_key, cancel_requested, error,
                           created_at, updated_at, finished_at, mode)
    SELECT md5(g::text)::uuid::text, 'saga_' || (g % 10), 1,
           (ARRAY['succeeded','succeeded','succeeded','succeeded','succeeded','succeeded','succeeded',
                  'succeeded','succeeded','succeeded','succeeded','succeeded','succeeded','succeeded',
                  'compensated','compensated','cancelled','running','compensation_failed','pending'])[g % 20 + 1],
           json_build_object('customer', 'c' || (g % 50000), 'order', g, 'amount', g % 997),
           'order-' || g, false, NULL,
           :t0 + make_interval(secs => g * 0.5), :t0 + make_interval(secs => g * 0.5 + 2),
           CASE WHEN g % 20 IN (17, 19) THEN NULL ELSE :t0 + make_interval(secs => g * 0.5 + 2) END, 'saga'
    FROM generate_series(1, :n) AS g
    """,
    """
    INSERT INTO saga_steps (run_id, idx, name, status, has_compensation, attempts, compensation_attempts,
                            compensation_round_attempts, started_at, finished_at, kind, best_effort, non_atomic,
                            pivot)
    SELECT r.id, s.idx, 'step_' || s.idx, 'succeeded', true, 1, 0, 0,
           r.created_at + make_interval(secs => s.idx), r.created_at + make_interval(secs => s.idx + 0.4),
           'action', false, false, false
    FROM saga_runs r CROSS JOIN (VALUES (0), (1)) AS s(idx)
    """,
    """
    INSERT INTO saga_events (run_id, kind, step, at)
    SELECT r.id, e.kind, e.step, r.created_at
    FROM saga_runs r CROSS JOIN (VALUES ('run_started', NULL), ('step_succeeded', 'step_0'),
                                        ('step_succeeded', 'step_1')) AS e(kind, step)
    UNION ALL
    SELECT r.id, 'run_' || r.status, NULL, r.finished_at FROM saga_runs r WHERE r.finished_at IS NOT NULL
    """,
    "CREATE INDEX ix_saga_runs_input ON saga_runs USING gin ((input::jsonb) jsonb_path_ops)",
    "VACUUM ANALYZE",  # what autovacuum does soon after a bulk load: sets the visibility map too
]


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: plans, caches
    took = []
    answer = None
    for _ in range(repeat):
        began = time.perf_counter()
        answer = fn()
        took.append(time.perf_counter() - began)
    return statistics.median(took), answer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--database", default=DATABASE, help=f"the bench's own database (default {DATABASE})")
    args = parser.parse_args(argv)
    admin = os.environ.get("SAGAFLOW_BENCH_PG", DEFAULT_PG)
    url = fresh_database(admin, args.database)

    def figure(name: str, seconds: float, **extra) -> None:
        print(json.dumps({"figure": name, "runs": args.runs, "ms": round(seconds * 1000, 2), **extra}), flush=True)

    try:
        from sagaflow.store.migrate import upgrade

        upgrade(url)
        engine = create_engine(url)
        t0 = dt.datetime(2026, 1, 1)
        began = time.perf_counter()
        with engine.begin() as conn:
            for statement in FILL[:-1]:
                conn.execute(text(statement), {"n": args.runs, "t0": t0})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(FILL[-1]))
        figure("fill", time.perf_counter() - began)
        # The rows went in past the runtime, whose transitions count themselves: count them once, as migration
        # 0006 does for the rows of an upgraded database (store/counters.py), then compact as the sweeper does.
        from sagaflow.store import Store

        seeding = Store(url)
        began = time.perf_counter()
        seeding.seed_counters()
        seeding.compact_counters()
        figure("seed_counters", time.perf_counter() - began)
        seeding.dispose()

        from sagaflow.app import configure
        from sagaflow.client import SagaClient
        from sagaflow.config.settings import Settings

        settings = Settings.from_env({**os.environ, "SAGAFLOW_DATABASE_URL": url,
                                      "SAGAFLOW_BROKER_URL": "redis://127.0.0.1:6379/14", "SAGAFLOW_IMPORTS": ""})
        configure(settings)
        client = SagaClient()
        middle = args.runs // 2
        at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=middle * 0.5)
        searches = {
            "list_newest": dict(),
            "by_idempotency_key": dict(idempotency_key=f"order-{middle}"),
            "by_input_customer": dict(input={"customer": "c4242"}),
            "by_input_order_as_text": dict(input={"order": str(middle)}),
            "by_input_and_status": dict(input={"customer": "c4242"}, status="succeeded"),
            "by_time_window": dict(since=at, until=at + dt.timedelta(hours=1)),
            "by_status_rare": dict(status="compensation_failed"),
            "by_input_and_time": dict(input={"customer": "c4242"}, since=at),
        }
        for name, filters in searches.items():
            seconds, page = timed(lambda f=filters: client.list(limit=50, **f), args.repeat)
            figure(f"search.{name}", seconds, total=page.total, exact=page.total_is_exact, page=len(page))

        from sagaflow.web import create_app

        web = create_app(settings).test_client()
        seconds, answer = timed(lambda: web.get("/metrics"), args.repeat)
        figure("metrics_scrape", seconds, status=answer.status_code, bytes=len(answer.data))
        seconds, _ = timed(lambda: client.stats(), max(1, args.repeat // 2))
        figure("client_stats", seconds)
    finally:
        if not args.keep:
            from sagaflow.app import get_store

            try:
                get_store().dispose()
            except Exception:  # noqa: BLE001 - dropping the database is what matters
                pass
            drop_database(admin, args.database)
    return 0


if __name__ == "__main__":
    sys.exit(main())
