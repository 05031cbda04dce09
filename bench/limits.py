"""The limits phase: what limits that never bind cost. W1 (4 no-op steps) with a run slot
(max_concurrent_runs), and on every step a concurrency slot and a rate start (bench/sagas.py W1_LIMITS),
against the same W1 without limits, both on the sagaflow worker: latency one at a time (alternating run by
run) and throughput (batches alternating over the rounds, each side's median). In the table the limited
runs are the "sagaflow" column and the unlimited ones the "plain" column: the ratio is limited/unlimited."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.figures import Figure, percentile, progress
from bench.sides import OneSagaSide

if TYPE_CHECKING:
    from bench.core import Bench


def phase_limits(bench: Bench) -> None:
    limited = OneSagaSide(bench.sf, "bench_w1_limits", "sagaflow, limits")
    free = OneSagaSide(bench.sf, "bench_w1", "sagaflow")
    n = bench.sizes.latency
    progress(f"limits: W1 with limits that never bind against W1, {n} runs one at a time per side")
    r = bench.one_at_a_time([limited, free], n, 4, None, "w1 latency, limits")
    lat = r["latencies"]
    bench.add(Figure(
        "limits_w1_latency_p50", "W1 latency p50 under limits that never bind (vs W1 without: plain column)",
        "ms", percentile(lat[limited.label], 0.5) * 1000 if lat[limited.label] else None,
        percentile(lat[free.label], 0.5) * 1000 if lat[free.label] else None, checked=r["ok"], n=n,
    ))
    n = bench.sizes.throughput
    rates: dict[str, list[float]] = {limited.label: [], free.label: []}
    ok = True
    for round_ in range(bench.sizes.rounds):
        progress(f"limits: W1 throughput, {n} runs at once per side, round {round_ + 1}")
        for side in (limited, free) if round_ % 2 == 0 else (free, limited):
            bench.warm_up(side, 4, None)
            out = bench.batch(side, n, 4, None, "w1 throughput, limits")
            ok = ok and out["ok"]
            if out["elapsed"]:
                rates[side.label].append(n / out["elapsed"])
            side.reset()
    bench.add(Figure(
        "limits_w1_throughput", f"W1 throughput under limits that never bind, {n} runs at once "
                                f"(vs W1 without: plain column)", "runs/s",
        statistics.median(rates[limited.label]) if rates[limited.label] else None,
        statistics.median(rates[free.label]) if rates[free.label] else None, checked=ok, n=n,
        extra={"rounds": {side: [round(x, 2) for x in v] for side, v in rates.items()}},
    ))
