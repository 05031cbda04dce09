"""The timed phases, sagaflow against the plain chain on the same workload: latency (one run at a time,
the sides alternating), throughput (runs started at once, in alternating rounds) and the cost of a step as
runs get longer (steps). Latency and throughput also run the plain chain on sagaflow's own Celery settings
and the peers (DBOS, celery-saga), each in the same rounds, so one run's figures compare them all."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.figures import STEP_COUNTS, Figure, Target, percentile, progress

if TYPE_CHECKING:
    from bench.core import Bench


def _others(bench: Bench) -> tuple[str, str, list[str]]:
    """The labels of the baseline, the same-settings chain and the peers that run."""
    return bench.pl.label, bench.same.label, [peer.label for peer in bench.peers]


def phase_latency(bench: Bench) -> None:
    sides = bench.headline_sides()
    plain, same, peers = _others(bench)
    for workload, fail_at in (("w1", None), ("w2", 3)):
        progress(f"latency: {workload.upper()}, {bench.sizes.latency} runs one at a time per side "
                 f"({', '.join(s.label for s in sides)})")
        r = bench.one_at_a_time(sides, bench.sizes.latency, 4, fail_at, f"{workload} latency")
        lat = r["latencies"]
        start_ms = {k: round(percentile(v, 0.5) * 1000, 3) for k, v in r["start_calls"].items()}

        def at(label: str, q: float, lat=lat) -> float | None:
            return percentile(lat[label], q) * 1000 if lat[label] else None

        for q, name in ((0.50, "p50"), (0.95, "p95")):
            bench.add(Figure(
                f"{workload}_latency_{name}", f"{workload.upper()} latency {name}, one run at a time", "ms",
                at("sagaflow", q), at(plain, q), same=at(same, q), peers={p: at(p, q) for p in peers},
                target=Target("ratio", "<=", 1.5) if name == "p50" else None,
                checked=r["ok"], n=bench.sizes.latency, extra={"start_call_ms_p50": start_ms},
            ))


def phase_throughput(bench: Bench) -> None:
    n = bench.sizes.throughput
    sides = bench.headline_sides()
    plain, same, peers = _others(bench)
    for workload, fail_at in (("w1", None), ("w2", 3)):
        rounds = bench.sizes.rounds
        progress(f"throughput: {workload.upper()}, {n} runs started at once per side, {rounds} round(s)")
        # On a shared machine one batch can land in a burst of load: alternate the sides over several
        # rounds and report each side's median.
        out = [bench.batches(sides, n, 4, fail_at, f"{workload} throughput, round {r + 1}") for r in range(rounds)]
        rates = {side.label: [n / o[side.label]["elapsed"] for o in out if o[side.label]["elapsed"]]
                 for side in sides}

        def median(label: str, rates=rates) -> float | None:
            return statistics.median(rates[label]) if rates[label] else None

        bench.add(Figure(
            f"{workload}_throughput", f"{workload.upper()} throughput, {n} runs at once", "runs/s",
            median("sagaflow"), median(plain), same=median(same), peers={p: median(p) for p in peers},
            target=Target("ratio", ">=", 0.75), checked=all(b["ok"] for o in out for b in o.values()), n=n,
            extra={"rounds": {label: [round(r, 2) for r in v] for label, v in rates.items()},
                   "submit_seconds": {label: round(b["submit_seconds"], 3) for label, b in out[-1].items()},
                   "ahead_of_peers": {p: (median("sagaflow") or 0) > (median(p) or 0) for p in peers}},
        ))
        for side in sides:
            side.reset()


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
