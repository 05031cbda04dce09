"""Peer: DBOS Transact 3.4 (pip install dbos), the same no-op steps, as a DBOS user writes a saga.

    @DBOS.workflow(name="bench_w2")
    def w2():
        undo = []
        try:
            for step, compensation in ...:   # s0..s3, the 4th raises
                step()
                undo.append(compensation)
        except PeerFailure:
            for compensation in reversed(undo):
                compensation()
            raise

Every step and compensation is a ``@DBOS.step``, so DBOS records each one's outcome in PostgreSQL (its
system database, here ``<bench database>_dbos``, a database of the bench's own) and a workflow resumes after a
crash from the last recorded step. The harness enqueues with ``DBOSClient.enqueue`` on a queue; executors
(``python -m bench.peer_dbos serve``, separate processes, one per Celery pool process by default) dequeue from
it by polling PostgreSQL. A worker_concurrency and polling interval are the executor's options (the bench
passes --dbos-worker-concurrency and --dbos-poll).

Outcome check, in SQL: each W1 workflow is SUCCESS and recorded exactly s0,s1,s2,s3; each W2 workflow is
ERROR (the failure re-raised after the compensations) and recorded s0,s1,s2,s3_fails,undo_s2,undo_s1,undo_s0, in
that order (operation_outputs.function_id is the order a workflow ran its steps).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from dbos import DBOS, DBOSConfig

QUEUE = "bench"
STEPS = 4
READY = "bench-dbos-executor-ready"


class PeerFailure(Exception):
    """W2's planned failure."""


def _step(name: str, fail: bool = False):
    def body() -> None:
        if fail:
            raise PeerFailure(f"planned failure of {name}")
        return None

    body.__name__ = body.__qualname__ = name
    return DBOS.step(name=name)(body)


STEP = [_step(f"s{i}") for i in range(STEPS)]
UNDO = [_step(f"undo_s{i}") for i in range(STEPS)]
FAIL_LAST = _step(f"s{STEPS - 1}_fails", fail=True)  # DBOS names are unique: W2's 4th step has its own


@DBOS.workflow(name="bench_w1")
def w1() -> str:
    for step in STEP:
        step()
    return "succeeded"


@DBOS.workflow(name="bench_w2")
def w2() -> str:
    undo = []
    try:
        for i, step in enumerate(STEP):
            (FAIL_LAST if i == STEPS - 1 else step)()
            undo.append(UNDO[i])
    except PeerFailure:
        for compensation in reversed(undo):
            compensation()
        raise
    return "succeeded"


def expected_order(fail_at: int | None) -> str:
    """The steps a workflow records, in order (W2's failed step is recorded too, with its error)."""
    if fail_at is None:
        return ",".join(f"s{i}" for i in range(STEPS))
    done = [f"s{i}" for i in range(fail_at)] + [f"s{fail_at}_fails"]
    return ",".join(done + [f"undo_s{i}" for i in range(fail_at - 1, -1, -1)])


def serve(database_url: str, worker_concurrency: int | None, poll: float) -> None:
    """An executor: launch DBOS on the system database, register the queue, run until SIGTERM."""
    config: DBOSConfig = {"name": "sagaflow_bench", "system_database_url": database_url,
                          "executor_id": f"bench-{os.getpid()}", "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=worker_concurrency, polling_interval_sec=poll)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(READY, flush=True)
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_dbos")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a DBOS executor that dequeues the bench's workflows")
    s.add_argument("database_url", help="the DBOS system database (postgresql://...)")
    s.add_argument("--worker-concurrency", type=int, default=None)
    s.add_argument("--poll", type=float, default=0.01, help="queue polling interval, seconds")
    args = p.parse_args(argv)
    serve(args.database_url, args.worker_concurrency, args.poll)
    return 0


# Started as `python -c "from bench.peer_dbos import main; main()" serve ...` (EXECUTOR_ARGV), not `-m`, so the
# module is bench.peer_dbos in the executor as in the harness (errors are pickled by module and name).
EXECUTOR_ARGV = [sys.executable, "-c", "import sys; from bench.peer_dbos import main; sys.exit(main())"]
