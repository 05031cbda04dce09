"""The timed phases, sagaflow against the plain chain on the same workload: latency (one run at a time,
the sides alternating), throughput (runs started at once, in alternating rounds) and the cost of a step as
runs get longer (steps)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.figures import STEP_COUNTS, Figure, Target, percentile, progress

if TYPE_CHECKING:
    from bench.core import Bench


def phase_latency(bench: Bench) -> None:
    for workload, fail_at in (("w1", None), ("w2", 3)):
        progress(f"latency: {workload.upper()}, {bench.sizes.latency} runs one at a time per side")
        r = bench.one_at_a_time([bench.sf, bench.pl], bench.sizes.latency, 4, fail_at, f"{workload} latency")
        sf, pl = r["latencies"]["sagaflow"], r["latencies"]["plain"]
        start_ms = {k: round(percentile(v, 0.5) * 1000, 3) for k, v in r["start_calls"].items()}
        for q, label in ((0.50, "p50"), (0.95, "p95")):
            bench.add(Figure(
                f"{workload}_latency_{label}", f"{workload.upper()} latency {label}, one run at a time", "ms",
                percentile(sf, q) * 1000 if sf else None, percentile(pl, q) * 1000 if pl else None,
                target=Target("ratio", "<=", 1.5) if label == "p50" else None,
                checked=r["ok"], n=bench.sizes.latency, extra={"start_call_ms_p50": start_ms},
            ))


def phase_throughput(bench: Bench) -> None:
    n = bench.sizes.throughput
    for workload, fail_at in (("w1", None), ("w2", 3)):
        rounds = bench.sizes.rounds
        progress(f"throughput: {workload.upper()}, {n} runs started at once per side, {rounds} round(s)")
        # On a shared machine one batch can land in a burst of load: alternate the sides over several
        # rounds and report each side's median.
        pairs = [bench.paired_batches(n, 4, fail_at, f"{workload} throughput, round {r + 1}")
                 for r in range(rounds)]
        rates = {side: [n / p[i]["elapsed"] for p in pairs if p[i]["elapsed"]]
                 for i, side in enumerate(("sagaflow", "plain"))}
        bench.add(Figure(
            f"{workload}_throughput", f"{workload.upper()} throughput, {n} runs at once", "runs/s",
            statistics.median(rates["sagaflow"]) if rates["sagaflow"] else None,
            statistics.median(rates["plain"]) if rates["plain"] else None,
            target=Target("ratio", ">=", 0.75), checked=all(p[0]["ok"] and p[1]["ok"] for p in pairs), n=n,
            extra={"rounds": {side: [round(r, 2) for r in v] for side, v in rates.items()},
                   "submit_seconds": {"sagaflow": round(pairs[-1][0]["submit_seconds"], 3),
                                      "plain": round(pairs[-1][1]["submit_seconds"], 3)}},
        ))
        bench.sf.reset()
        bench.pl.reset()


def phase_steps(bench: Bench) -> None:
    per_step = {}
    for steps in STEP_COUNTS:
        runs = max(1, bench.sizes.step_total // steps)
        progress(f"steps: {runs} runs of {steps} steps at once per side")
        sf, pl = bench.paired_batches(runs, steps, None, f"{steps}-step throughput")
        cost = {k: (v["elapsed"] / (runs * steps) if v["elapsed"] else None) for k, v in
                (("sagaflow", sf), ("plain", pl))}
        per_step[steps] = (cost, sf["ok"] and pl["ok"])
        bench.add(Figure(
            f"step_cost_{steps}", f"cost per step, {steps}-step runs ({runs} at once)", "ms/step",
            cost["sagaflow"] * 1000 if cost["sagaflow"] else None,
            cost["plain"] * 1000 if cost["plain"] else None, checked=per_step[steps][1], n=runs,
        ))
        bench.sf.reset()
        bench.pl.reset()
    (c4, ok4), (c64, ok64) = per_step[4], per_step[64]

    def growth(side):
        return c64[side] / c4[side] if c64[side] and c4[side] else None

    bench.add(Figure("step_cost_growth_64_vs_4", "cost per step of 64-step runs / of 4-step runs", "x",
                    growth("sagaflow"), growth("plain"), target=Target("sagaflow", "<=", 1.2),
                    checked=ok4 and ok64))
