"""The policy_off phase: W1 with compensation switched off by policy (sagaflow/model/policy.py: a plain chain of
the same step tasks, the run row alone in SQL) against the plain Celery chain, and its SQL per run."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from bench.figures import Figure, Target, percentile, progress
from bench.sides import PolicyOffSide
from bench.sql import counted_batch

if TYPE_CHECKING:
    from bench.core import Bench


def phase_policy_off(bench: Bench) -> None:
    """W1 with compensation off by policy against the plain chain: latency (one at a time, alternating),
    throughput (n at once), and the SQL of each run, client and worker, counted by the listeners of
    bench/sqlcount.py (expected: the run row's INSERT and its final UPDATE)."""
    import sagaflow.app

    off = PolicyOffSide(bench.sf)
    saved = sagaflow.app._settings
    sagaflow.app._settings = saved.with_(saga_enabled=False)  # what SAGAFLOW_SAGA_ENABLED=false gives
    try:
        n = bench.sizes.latency
        progress(f"policy_off: W1 with compensation off, {n} runs one at a time per side")
        r = bench.one_at_a_time([off, bench.pl], n, 4, None, "w1 latency, compensation off")
        lat = r["latencies"]
        bench.add(Figure(
            "off_w1_latency_p50", "W1 latency p50, compensation off by policy", "ms",
            percentile(lat["sagaflow, compensation off"], 0.5) * 1000 if lat["sagaflow, compensation off"] else None,
            percentile(lat["plain"], 0.5) * 1000 if lat["plain"] else None, checked=r["ok"], n=n,
        ))
        n = bench.sizes.throughput
        progress(f"policy_off: W1 with compensation off, {n} runs at once per side")
        out = {}
        for side in (off, bench.pl):
            bench.warm_up(side, 4, None)
            out[side.label] = bench.batch(side, n, 4, None, "w1 throughput, compensation off")
            side.reset()
        sf, pl = out["sagaflow, compensation off"], out["plain"]
        bench.add(Figure(
            "off_w1_throughput", f"W1 throughput, compensation off by policy, {n} runs at once", "runs/s",
            n / sf["elapsed"] if sf["elapsed"] else None, n / pl["elapsed"] if pl["elapsed"] else None,
            checked=sf["ok"] and pl["ok"], n=n,
        ))
        n = bench.sizes.sql
        progress(f"policy_off: counting the SQL of {n} W1 runs with compensation off")
        bench.stop_worker("sagaflow")
        try:
            bench.start_sagaflow_worker("counting-off", "bench.sagas,bench.sqlcount")
            counts, client, ok, _ = counted_batch(bench, off, n, None, "w1 SQL count, compensation off")
        finally:
            bench.stop_worker("counting-off")
        worker = Counter({k: v for k, v in counts.items() if "|" not in k})
        both = worker + Counter(client)
        kinds = ("statement", "begin", "commit", "rollback", "ping")
        bench.add(Figure(
            "off_sql_statements_per_run", "SQL statements per W1 run, compensation off (client + worker)",
            "statements", both["statement"] / n, target=Target("sagaflow", "<=", 2), checked=ok,
            n=n, extra={"client": {k: client.get(k, 0) / n for k in kinds},
                        "worker": {k: worker.get(k, 0) / n for k in kinds}},
        ))
        bench.add(Figure(
            "off_sql_round_trips_per_run", "SQL round trips per W1 run, compensation off (client + worker)",
            "round trips", sum(both[k] for k in kinds) / n, checked=ok, n=n,
        ))
    finally:
        sagaflow.app._settings = saved
