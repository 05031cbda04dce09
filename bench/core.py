"""The Bench every phase works with: setup and teardown of the services and workers, and the primitives
the phases are made of (a batch of runs at once, runs one at a time, both sides in turn)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from bench.figures import SIZES, Figure, progress
from bench.services import check_services, drop_database, fresh_database
from bench.sides import PlainSide, SagaflowSide
from bench.workers import Worker


class Bench:
    """What every phase works with: the sizes and options, the two sides, the workers, and the figures and
    problems found so far. The phases are functions of a Bench (bench/harness.py runs them in order)."""

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

        from sagaflow.app import celery_app, configure
        from sagaflow.config.settings import Settings
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
                    # the end time is the run's own record: a slower poll loses no precision, and loads the machine less
                    time.sleep(0.02)
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

    def paired_batches(self, n: int, steps: int, fail_at: int | None, what: str) -> tuple[dict, dict]:
        out = {}
        for side in (self.sf, self.pl):
            self.warm_up(side, steps, fail_at)
            progress(f"  {side.label}: {what}")
            out[side.label] = self.batch(side, n, steps, fail_at, what)
        return out["sagaflow"], out["plain"]
