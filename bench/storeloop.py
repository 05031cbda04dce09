"""The store's success path alone, no Celery: claim and complete each step of 4-step runs on PostgreSQL, the
claim's commit waiting for the WAL flush ("durable claim", as before issue 15) or not (as shipped), in
alternating rounds. Prints steps per second and the median time of a step (claim + complete).

    python -m bench.storeloop postgresql+psycopg2://postgres@127.0.0.1:5432/DB [--rounds 5] [--runs 100]
                              [--processes 1,2,4]

DB must be migrated (sagaflow db upgrade); each round adds its runs to it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from multiprocessing import Process, Queue

from sagaflow.store import Store, fastpath

STEPS = [("a", True), ("b", True), ("c", True), ("d", True)]
VARIANTS = {
    "durable claim": fastpath.CLAIM_STEP.execute.removeprefix(fastpath.NO_FLUSH_WAIT),
    "as shipped": fastpath.CLAIM_STEP.execute,
}


def _work(url: str, variant: str, runs: int, out: Queue) -> None:
    fastpath.CLAIM_STEP.execute = VARIANTS[variant]  # this process only; the PREPAREd statement is the same
    store = Store(url)
    store.create_run(uuid.uuid4().hex, "s", 1, {}, STEPS)  # the connection, prepared, before timing
    ids = [uuid.uuid4().hex for _ in range(runs)]
    for run_id in ids:
        store.create_run(run_id, "s", 1, {}, STEPS)
    per_step = []
    began = time.perf_counter()
    for run_id in ids:
        for k in range(len(STEPS)):
            t = time.perf_counter()
            token = f"{run_id}{k}:0"
            store.claim_step(run_id, k, token, [], 30)
            if k < len(STEPS) - 1:
                assert store.complete_step(run_id, k, token, {"k": k})
            else:
                assert store.complete_last_step(run_id, k, token, {"k": k}) == "succeeded"
            per_step.append(time.perf_counter() - t)
    out.put((time.perf_counter() - began, statistics.median(per_step), len(per_step)))
    store.dispose()


def one_round(url: str, variant: str, processes: int, runs: int) -> tuple[float, float]:
    """(steps per second over all processes, median ms per step)."""
    out: Queue = Queue()
    procs = [Process(target=_work, args=(url, variant, runs, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[0] for r in results)
    return sum(r[2] for r in results) / wall, statistics.median(r[1] for r in results) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=100, help="runs per process per round")
    p.add_argument("--processes", default="1,2,4")
    args = p.parse_args()
    for processes in (int(x) for x in args.processes.split(",")):
        rounds: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                rounds[variant].append(one_round(args.url, variant, processes, args.runs))
        for variant, figures in rounds.items():
            print(f"{processes} process(es), {variant}: {statistics.median(f[0] for f in figures):.0f} steps/s "
                  f"(rounds: {', '.join(str(round(f[0])) for f in figures)}), "
                  f"{statistics.median(f[1] for f in figures):.3f} ms per step (median)", flush=True)


if __name__ == "__main__":
    main()
