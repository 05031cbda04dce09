"""The figures: the sizes of a run, the phases and the figures each produces, targets, percentiles, the
progress lines on stderr and the table printed at the end."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

PHASES = ("latency", "throughput", "steps", "runs", "sql", "limits", "policy_off", "embedded")
STEP_COUNTS = (4, 16, 64)


@dataclass(frozen=True)
class Sizes:
    latency: int  # runs, one at a time, per workload and side
    throughput: int  # runs started at once, per workload and side
    step_total: int  # step executions per point of the step scaling: runs = step_total // steps
    runs: tuple[int, ...]  # runs started at once; memory is compared around the last (largest)
    sql: int  # runs whose SQL is counted
    warmup: int = 2  # runs before each timed phase, not counted
    rounds: int = 1  # throughput: batches per side, alternating; the median of each side is reported


SIZES = {
    "full": Sizes(latency=50, throughput=500, step_total=2048, runs=(100, 1000, 5000), sql=100, rounds=3),
    "quick": Sizes(latency=10, throughput=100, step_total=256, runs=(50, 100, 300), sql=20),
    "smoke": Sizes(latency=3, throughput=10, step_total=128, runs=(5, 10, 20), sql=4, warmup=1),
}


@dataclass(frozen=True)
class Target:
    on: str  # "ratio" or "sagaflow"
    op: str  # ">=" or "<="
    value: float

    def met(self, figure: "Figure") -> bool | None:
        x = figure.ratio if self.on == "ratio" else figure.sagaflow
        if x is None:
            return None
        return x >= self.value if self.op == ">=" else x <= self.value

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.value:g}"


@dataclass
class Figure:
    name: str
    title: str
    unit: str
    sagaflow: float | None
    plain: float | None = None
    target: Target | None = None
    checked: bool = True  # every run behind this figure ended as it should, on every side
    n: int | None = None
    extra: dict = field(default_factory=dict)
    # The plain chain on sagaflow's own Celery settings (the second row; `plain` is Celery's defaults + acks_late)
    same: float | None = None
    # The peers' values, by label ("DBOS", "celery-saga"), in the timed phases
    peers: dict[str, float | None] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.sagaflow is None or not self.plain:
            return None
        return self.sagaflow / self.plain

    @property
    def ratio_same(self) -> float | None:
        if self.sagaflow is None or not self.same:
            return None
        return self.sagaflow / self.same

    @property
    def result(self) -> str | None:
        if self.target is None:
            return None
        met = self.target.met(self)
        return None if met is None else ("PASS" if met else "MISS")

    def to_json(self) -> dict:
        return {
            "name": self.name, "title": self.title, "unit": self.unit,
            "sagaflow": _round(self.sagaflow), "plain": _round(self.plain), "ratio": _round(self.ratio),
            "plain_same_settings": _round(self.same), "ratio_same_settings": _round(self.ratio_same),
            "peers": {k: _round(v) for k, v in self.peers.items()},
            "target": str(self.target) if self.target else None, "result": self.result,
            "checked": self.checked, "n": self.n, "extra": self.extra,
        }


def _round(x):
    return None if x is None else round(x, 6)


def expected_figures(sizes: Sizes, phases=PHASES) -> list[str]:
    """Every figure name a run with these sizes and phases produces, in the order it prints them (the smoke
    test checks them)."""
    names = []
    if "latency" in phases:
        names += ["w1_latency_p50", "w1_latency_p95", "w2_latency_p50", "w2_latency_p95"]
    if "throughput" in phases:
        names += ["w1_throughput", "w2_throughput"]
    if "steps" in phases:
        names += [f"step_cost_{n}" for n in STEP_COUNTS] + ["step_cost_growth_64_vs_4"]
    if "runs" in phases:
        for n in sizes.runs:
            names += [f"runs_{n}_throughput", f"runs_{n}_state_bytes_per_run"]
        names += ["worker_rss_before", "worker_rss_after", "worker_rss_growth"]
    if "limits" in phases:  # before policy_off, which stops the sagaflow worker (harness.RUNNERS)
        names += ["limits_w1_latency_p50", "limits_w1_throughput"]
    if "policy_off" in phases:  # it runs before sql (harness.RUNNERS)
        names += ["off_w1_latency_p50", "off_w1_throughput", "off_sql_statements_per_run",
                  "off_sql_round_trips_per_run"]
    if "sql" in phases:
        names += ["sql_round_trips_per_step", "sql_durable_commits_per_step", "sql_round_trips_per_step_listeners",
                  "sql_statements_per_step",
                  "sql_round_trips_per_start", "w2_sql_round_trips_per_run"]
    if "embedded" in phases:
        names += ["embedded_demo_seconds", "embedded_demo_runs_seconds"]
    return names


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def progress(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


def _fmt(x):
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _grid(rows: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


SYSTEM_COLUMNS = (("w1_throughput", "W1 runs/s"), ("w2_throughput", "W2 runs/s"),
                  ("w1_latency_p50", "W1 p50 ms"), ("w2_latency_p50", "W2 p50 ms"))


def systems_table(figures: list[Figure]) -> list[str]:
    """The issue's comparison: one row per system (the baseline, the same-settings chain, each peer,
    sagaflow), the headline figures as columns; empty when the timed phases did not run."""
    by_name = {f.name: f for f in figures}
    shown = [by_name.get(name) for name, _ in SYSTEM_COLUMNS]
    if not any(shown):
        return []
    peers = sorted({p for f in shown if f for p in f.peers})
    systems = [("plain Celery chain, Celery defaults + acks_late", lambda f: f.plain),
               ("plain Celery chain, sagaflow's Celery settings", lambda f: f.same)]
    systems += [(peer, lambda f, peer=peer: f.peers.get(peer)) for peer in peers]
    systems.append(("sagaflow", lambda f: f.sagaflow))
    rows: list[tuple] = [("system", *(title for _, title in SYSTEM_COLUMNS))]
    for label, value in systems:
        rows.append((label, *(_fmt(value(f)) + ("" if f.checked else "?") if f else "-" for f in shown)))
    return _grid(rows)


def render_table(figures: list[Figure], info: dict, summary: dict) -> str:
    rows = [("figure", "unit", "sagaflow", "plain", "ratio", "plain, same settings", "ratio", "target", "")]
    for f in figures:
        rows.append((f.title + ("" if f.checked else "  [UNCHECKED]"), f.unit, _fmt(f.sagaflow), _fmt(f.plain),
                     _fmt(f.ratio), _fmt(f.same), _fmt(f.ratio_same), str(f.target) if f.target else "",
                     f.result or ""))
    out = [f"sagaflow vs plain Celery chain: size {info['size']}, {info['cpus']} CPUs, load average "
           f"{info['loadavg_start'][0]} at start / {info['loadavg_end'][0]} at end, {info['seconds']} s",
           "plain = Celery's defaults + acks_late (the baseline); plain, same settings = sagaflow's Celery settings"]
    out += _grid(rows)
    systems = systems_table(figures)
    if systems:
        out += ["", "against what users would pick instead (same run, same Redis and PostgreSQL):"] + systems
    for note in info.get("skipped", []):
        out.append(f"skipped: {note}")
    out.append("outcome checks: " + ("every run ended as it should" if summary["outcome_checks_passed"]
                                     else f"{len(summary['problems'])} problem(s): " + "; ".join(summary["problems"])))
    return "\n".join(out)
