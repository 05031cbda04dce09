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
from bench.sides import CelerySagaSide, DbosSide, PlainSide, SagaflowSide
from bench.workers import Worker

# The peers the timed phases run beside sagaflow, the package each needs (the `bench` extra), and its label.
PEERS = {"dbos": ("dbos", "DBOS"), "celery-saga": ("celery_saga", "celery-saga")}


def missing_package(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) is not None else module


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
        self.peers: list = []  # the peer sides that run (DbosSide, CelerySagaSide)
        self.skipped: list[str] = []  # peers asked for whose package is missing, said in the table
        self.dbos_database = ""

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
            **({"SAGAFLOW_PREFETCH": str(self.args.prefetch)} if self.args.prefetch else {}),
        })
        configure(self.settings)
        import bench.sagas  # noqa: F401  SagaClient.start needs the definitions in this process

        self.celery_app = celery_app
        self.sf = SagaflowSide(self.database_url)
        env = self.settings.as_env()
        self.pl = PlainSide(self.args.redis_url, self.args.plain_errback, env=env)
        self.same = PlainSide(self.args.redis_url, self.args.plain_errback, same=True, env=env)
        # The bench's own Redis db only; refuse if some worker already consumes it.
        if celery_app.control.ping(timeout=1.0) or self.pl.app.control.ping(timeout=0.5):
            raise SystemExit(f"bench: a worker already listens on {self.args.redis_url}; stop it or pass "
                             f"another --redis-url (the bench flushes its db)")
        redis.Redis.from_url(self.args.redis_url).flushdb()

    def setup_peers(self) -> None:
        """The peers asked for whose package is installed; a missing one is said and skipped."""
        for key in self.args.peers:
            module, label = PEERS[key]
            if missing_package(module):
                note = (f"the {label} row: its package is not installed "
                        f"(pip install -r requirements-bench.txt, or pip install -e '.[bench]')")
                self.skipped.append(note)
                progress(f"bench: skipping {note}")
                continue
            if key == "celery-saga":
                self.peers.append(CelerySagaSide(self.args.redis_url))
            else:
                self.dbos_database = f"{self.args.database}_dbos"
                self.peers.append(DbosSide(fresh_database(self.args.pg_admin_url, self.dbos_database)))

    def teardown(self) -> None:
        for worker in list(self.workers.values()):
            worker.stop()
        self.workers.clear()
        for peer in self.peers:
            if isinstance(peer, DbosSide):
                peer.close()
        if hasattr(self, "sf"):
            self.sf.pg.close()
            from sagaflow.app import get_store

            get_store().dispose()
        if self.database_url:  # setup got past its checks: the Redis db is ours, the workers are gone
            import redis

            redis.Redis.from_url(self.args.redis_url).flushdb()
            if not self.args.keep_db:
                drop_database(self.args.pg_admin_url, self.args.database)
                if self.dbos_database:
                    drop_database(self.args.pg_admin_url, self.dbos_database)

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

    def start_celery_worker(self, key: str, app_path: str, app, queue: str) -> Worker:
        """A plain Celery worker of ``app_path`` on ``queue`` (its settings are the app's own: no -E)."""
        progress(f"starting the {key} worker (prefork, {self.args.concurrency} processes)")
        worker = Worker(
            key, [sys.executable, "-m", "celery", "-A", app_path, "worker", "-P", "prefork",
                  "-c", str(self.args.concurrency), "-Q", queue, "-l", "WARNING"],
            self.worker_env("bench.sagas"), self.workdir / f"{key}-worker.log",
            lambda node: bool(app.control.ping(destination=[node], timeout=0.5)),
            f"bench-{key}-{os.getpid()}@%h",
        )
        self.workers[key] = worker
        return worker

    def start_plain_worker(self) -> Worker:
        self.start_celery_worker("plain_same", "bench.plain:same_app", self.same.app, self.same.queue)
        return self.start_celery_worker("plain", "bench.plain:app", self.pl.app, self.pl.queue)

    def start_peer_workers(self) -> None:
        """celery-saga's Celery worker; DBOS's executors, one after the other (the first creates DBOS's
        tables), each until it says it is ready, then paused until DBOS's own runs."""
        for peer in self.peers:
            if isinstance(peer, CelerySagaSide):
                self.start_celery_worker("celery_saga", "bench.peer_celery_saga:app", peer.peer.app,
                                         peer.peer.QUEUE)
                continue
            from bench import peer_dbos  # here: only a DBOS peer needs the dbos package

            n = self.args.dbos_processes or self.args.concurrency
            progress(f"starting {n} DBOS executor(s) (worker_concurrency {self.args.dbos_worker_concurrency}, "
                     f"polling every {self.args.dbos_poll} s)")
            argv = [*peer_dbos.EXECUTOR_ARGV, "serve", peer.url, "--poll", str(self.args.dbos_poll)]
            if self.args.dbos_worker_concurrency:
                argv += ["--worker-concurrency", str(self.args.dbos_worker_concurrency)]
            for i in range(n):
                log = self.workdir / f"dbos-executor-{i}.log"
                worker = Worker(f"dbos-{i}", argv, self.worker_env("bench.sagas"), log,
                                lambda _node, log=log: log.exists() and peer_dbos.READY in log.read_text(),
                                "", hostname_arg=False)
                self.workers[f"dbos-{i}"] = worker
                peer.workers.append(worker)
            peer.connect()
            peer.pause()

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
        side.resume()
        try:
            return self._batch(side, n, steps, fail_at, what, quiet)
        finally:
            side.pause()

    def _batch(self, side, n: int, steps: int, fail_at: int | None, what: str, quiet: bool) -> dict:
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
                side.resume()
                t0 = time.time()
                run_id = side.start(steps, fail_at)
                start_calls[side.label].append(time.time() - t0)
                deadline = time.monotonic() + 30
                while (end := side.finished_at(run_id)) is None:
                    if time.monotonic() > deadline:
                        break
                    # the end time is the run's own record: a slower poll loses no precision, and loads the machine less
                    time.sleep(0.02)
                side.pause()
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
        out = self.batches([self.sf, self.pl], n, steps, fail_at, what)
        return out["sagaflow"], out["plain"]

    def batches(self, sides: list, n: int, steps: int, fail_at: int | None, what: str) -> dict[str, dict]:
        """One batch per side, in turn (each after a warm-up); by label."""
        out = {}
        for side in sides:
            self.warm_up(side, steps, fail_at)
            progress(f"  {side.label}: {what}")
            out[side.label] = self.batch(side, n, steps, fail_at, what)
        return out

    def headline_sides(self) -> list:
        """The sides of the headline figures (latency, throughput): sagaflow, both plain chains, the peers."""
        return [self.sf, self.pl, self.same, *self.peers]
