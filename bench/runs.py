"""The runs phase: W1 throughput at growing numbers of runs at once, the state tables' bytes per run, and
the workers' memory (RSS) around the largest batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.figures import Figure, Target, progress

if TYPE_CHECKING:
    from bench.core import Bench


def phase_runs(bench: Bench) -> None:
    largest = max(bench.sizes.runs)
    rss_before = None
    for n in bench.sizes.runs:
        if n == largest:
            rss_before = {k: bench.workers[k].rss() for k in ("sagaflow", "plain")}
        progress(f"runs: {n} W1 runs started at once per side")
        sf, pl = bench.paired_batches(n, 4, None, f"{n} runs")
        ok = sf["ok"] and pl["ok"]
        bench.add(Figure(
            f"runs_{n}_throughput", f"W1 throughput, {n} runs at once", "runs/s",
            n / sf["elapsed"] if sf["elapsed"] else None, n / pl["elapsed"] if pl["elapsed"] else None,
            checked=ok, n=n,
        ))
        sizes = bench.sf.table_bytes()
        bench.add(Figure(
            f"runs_{n}_state_bytes_per_run", f"state tables per run after {n} W1 runs", "bytes",
            sum(sizes.values()) / n, None, checked=sf["ok"], n=n,
            extra={"table_bytes": sizes, "note": "pg_total_relation_size, dead row versions included"},
        ))
        bench.sf.reset()
        bench.pl.reset()
    rss_after = {k: bench.workers[k].rss() for k in ("sagaflow", "plain")}
    at_start = {k: round(sum(bench.workers[k].rss_at_start.values()), 1) for k in ("sagaflow", "plain")}
    total = {when: {k: sum(v.values()) for k, v in rss.items()} for when, rss in
             (("before", rss_before), ("after", rss_after))}
    for when, rss in (("before", rss_before), ("after", rss_after)):
        bench.add(Figure(
            f"worker_rss_{when}", f"worker RSS (main + pool) {when} the {largest} runs", "MB",
            total[when]["sagaflow"], total[when]["plain"], n=largest,
            extra={**{k: {p: round(mb, 1) for p, mb in v.items()} for k, v in rss.items()},
                   "total_mb_when_the_worker_started": at_start},
        ))
    # Flat: under 5% over the largest batch (after the earlier phases warmed the worker up); the growth
    # per run says what a leak would cost.
    bench.add(Figure(
        "worker_rss_growth", f"worker RSS after / before {largest} runs", "x",
        total["after"]["sagaflow"] / total["before"]["sagaflow"],
        total["after"]["plain"] / total["before"]["plain"], target=Target("sagaflow", "<=", 1.05), n=largest,
        extra={"growth_kb_per_run": {k: round((total["after"][k] - total["before"][k]) * 1024 / largest, 3)
                                     for k in ("sagaflow", "plain")}},
    ))
