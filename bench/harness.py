"""python -m bench: sagaflow against a plain Celery chain, in one run, on the same Redis and PostgreSQL.

The baseline is the plain chain on Celery's own defaults plus acks_late (what a user would run instead); the
same chain on sagaflow's Celery settings is a second row, and DBOS and celery-saga (the `bench` extra) are
peer rows in the latency and throughput phases. All workers run side by side for the whole run (prefork, 2
processes each; DBOS: 2 executor processes, paused while other sides run), each on its own queue, so the
phases can alternate between them and a change in the machine's load hits every side alike. Every run's
outcome is checked (sagaflow in SQL, plain through the record its last task writes to Redis); a figure
whose runs did not all end as they should is marked unchecked and the command exits 2. Missing a target
is printed (MISS) and does not change the exit code: a benchmark prints figures, it does not assert them.

Phases (--only): latency, throughput, steps, runs, sql, policy_off, limits, embedded; and, with --profile, profile.
limits measures W1 under limits that never bind (a run slot, a concurrency slot and a rate start per step: the
SQL bookkeeping of store/limits.py) against the same W1 without limits, both on sagaflow.
policy_off measures W1 with compensation switched off by policy (sagaflow/model/policy.py: a plain chain of the
same step tasks, the run row alone in SQL) against the plain Celery chain, and counts its SQL per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.core import PEERS, Bench
from bench.embedded import phase_embedded
from bench.figures import PHASES, SIZES, progress, render_table
from bench.limits import phase_limits
from bench.policy_off import phase_policy_off
from bench.profile import phase_profile
from bench.runs import phase_runs
from bench.services import ROOT
from bench.sql import phase_sql
from bench.timed import phase_latency, phase_steps, phase_throughput

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "sagaflow_bench"

# The phases that need the workers, in the order they run (expected_figures lists their figures in it);
# embedded runs after them, once the workers are stopped.
RUNNERS = {
    "latency": phase_latency, "throughput": phase_throughput, "steps": phase_steps, "runs": phase_runs,
    "profile": phase_profile, "limits": phase_limits, "policy_off": phase_policy_off, "sql": phase_sql,
}


def run(bench: Bench) -> int:
    """Set up, run the phases asked for, tear down; then the table and the JSON lines. Exit code 2 if some
    run did not end as it should."""
    started = time.time()
    info = run_info(bench)
    try:
        bench.setup()
        info["database_server"] = bench.sf.sql("SHOW server_version")[0][0]
        timed = [p for p in ("latency", "throughput", "steps", "runs", "limits", "policy_off") if p in bench.phases]
        if timed or "profile" in bench.phases:
            bench.start_sagaflow_worker()
        if timed:
            bench.start_plain_worker()
        if {"latency", "throughput"} & set(bench.phases):
            bench.setup_peers()
            bench.start_peer_workers()
        info["skipped"] = bench.skipped
        for phase, run_phase in RUNNERS.items():
            if phase in bench.phases:
                run_phase(bench)
        for key in list(bench.workers):
            bench.stop_worker(key)
        if "embedded" in bench.phases:
            phase_embedded(bench)
    finally:
        bench.teardown()
    info["seconds"] = round(time.time() - started, 1)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report(bench, info)
    return 2 if bench.problems else 0


def report(bench: Bench, info: dict) -> None:
    missed = [f.name for f in bench.figures if f.result == "MISS"]
    summary = {"name": "summary", "outcome_checks_passed": not bench.problems, "problems": bench.problems,
               "figures": len(bench.figures), "targets_missed": missed}
    lines = [json.dumps(info)] + [json.dumps(f.to_json()) for f in bench.figures] + [json.dumps(summary)]
    print(render_table(bench.figures, info, summary))
    if bench.args.json:
        Path(bench.args.json).write_text("\n".join(lines) + "\n")
        progress(f"JSON lines written to {bench.args.json}")
    else:
        print("\n".join(lines))


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
        "baseline": "plain chain on Celery's defaults + task_acks_late (bench/plain.py: app)",
        "peers": list(bench.args.peers), "dbos": {"processes": bench.args.dbos_processes or bench.args.concurrency,
                                                  "worker_concurrency": bench.args.dbos_worker_concurrency,
                                                  "poll_seconds": bench.args.dbos_poll},
        "prefetch": bench.args.prefetch or "default",
        "plain_errback": bench.args.plain_errback, "git": commit,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"peers run beside sagaflow in the latency and throughput phases, among {', '.join(PEERS)}, "
                        f"or none (default: both; a peer whose package is missing is skipped and said: "
                        f"pip install -r requirements-bench.txt)")
    p.add_argument("--dbos-processes", type=int, default=0,
                   help="DBOS executor processes (default: --concurrency, one per Celery pool process)")
    p.add_argument("--dbos-worker-concurrency", type=int, default=0,
                   help="DBOS queue worker_concurrency per executor (default: none, DBOS's own default)")
    p.add_argument("--dbos-poll", type=float, default=0.01,
                   help="DBOS queue polling interval in seconds (default %(default)s; DBOS's own is 1 s)")
    p.add_argument("--prefetch", type=int, default=0,
                   help="SAGAFLOW_PREFETCH for the sagaflow worker and the same-settings chain (default: sagaflow's)")
    args = p.parse_args(argv)
    peers = [x.strip() for x in args.peers.split(",") if x.strip() and x.strip() != "none"]
    if set(peers) - set(PEERS):
        p.error(f"unknown peer(s) {', '.join(sorted(set(peers) - set(PEERS)))}; choose among {', '.join(PEERS)}")
    args.peers = tuple(peers)
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
    return run(Bench(args))
