"""Prometheus metrics on /metrics, read at scrape time from the counters the store keeps in SQL.

Why not counters incremented in the process? Steps run in prefork pool processes, on any number of hosts,
which come and go: in-process counters would each see a slice and reset on every restart. Instead every
transition appends what it changes to a counter log in the same statement or transaction as the transition
(sagaflow/store/counters.py), and the sweeper compacts the log into one row per series. A scrape is one
SELECT over those two small tables: the numbers are the same whichever web process answers, survive
restarts, never go down after a prune, and cost the same with a million runs as with a thousand
(``sagaflow_metrics_collect_seconds`` says how long the read took).
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from sagaflow.client import SagaClient
from sagaflow.model.definition import registry as sagas
from sagaflow.model.events import EventKind
from sagaflow.model.status import RunStatus

log = logging.getLogger("sagaflow.web")

metrics = Blueprint("metrics", __name__)


class SagaflowCollector(Collector):
    def __init__(self, client_factory=SagaClient) -> None:
        self.client_factory = client_factory

    def describe(self):
        return []  # collected lazily: registering must not query the database

    def collect(self):
        began = time.perf_counter()
        read = self.client_factory().metrics()
        counts, ends, events = read.run_counts, read.run_end_counts, read.step_event_counts
        step_hist, comp_hist = read.step_durations, read.compensation_durations

        known = sorted({s.name for s in sagas.all()} | {saga for saga, _ in counts} | set(read.runs_started))
        started = CounterMetricFamily("sagaflow_runs_started", "Runs started, by saga.", labels=["saga"])
        in_status = GaugeMetricFamily("sagaflow_runs", "Runs in each status now, by saga.", labels=["saga", "status"])
        failed_now = GaugeMetricFamily("sagaflow_runs_compensation_failed",
                                       "Runs waiting for an operator now (compensation_failed), by saga.",
                                       labels=["saga"])
        for saga in known:
            per_status = {status: n for (s, status), n in counts.items() if s == saga}
            # ever started: the rows there are plus those pruned (SagaClient.metrics adds saga_totals)
            started.add_metric([saga], read.runs_started.get(saga, sum(per_status.values())))
            for status in RunStatus:
                in_status.add_metric([saga, status.value], per_status.get(status.value, 0))
            failed_now.add_metric([saga], per_status.get(RunStatus.COMPENSATION_FAILED.value, 0))

        finished = CounterMetricFamily("sagaflow_runs_finished",
                                       "Times a run reached a final status, by saga and status.",
                                       labels=["saga", "status"])
        for (saga, status), n in sorted(ends.items()):
            finished.add_metric([saga, status], n)

        steps = CounterMetricFamily("sagaflow_steps", "Step actions that ended, by outcome.",
                                    labels=["saga", "step", "outcome"])
        retries = CounterMetricFamily("sagaflow_retries", "Retries scheduled, of actions and of compensations.",
                                      labels=["saga", "step", "phase"])
        compensations = CounterMetricFamily("sagaflow_compensations", "Compensations that ended, by outcome.",
                                            labels=["saga", "step", "outcome"])
        for (saga, step, kind), n in sorted(events.items()):
            if kind in (EventKind.STEP_SUCCEEDED, EventKind.STEP_FAILED):
                steps.add_metric([saga, step, kind.removeprefix("step_")], n)
            elif kind == EventKind.STEP_RETRIED:
                retries.add_metric([saga, step, "action"], n)
            elif kind == EventKind.COMPENSATION_RETRIED:
                retries.add_metric([saga, step, "compensation"], n)
            else:
                compensations.add_metric([saga, step, kind.removeprefix("compensation_")], n)

        queued = GaugeMetricFamily("sagaflow_queued", "Runs (step=\"run\") and steps waiting in a limit's line "
                                   "now (max_concurrent_runs, concurrency, rate_limit), by saga.",
                                   labels=["saga", "step"])
        for (saga, step), n in sorted(read.queued.items()):
            queued.add_metric([saga, step], n)

        yield from (started, finished, in_status, failed_now, steps, retries, compensations, queued)
        yield _histogram("sagaflow_step_duration_seconds",
                         "Step durations, first start to success or final failure (retries included), by saga, "
                         "step and outcome.", step_hist, labels=("saga", "step", "outcome"))
        yield _histogram("sagaflow_compensation_duration_seconds",
                         "Compensation durations, first start of a round to success or final failure (retries "
                         "included), by saga, step and outcome.", comp_hist, labels=("saga", "step", "outcome"))
        yield _histogram("sagaflow_run_duration_seconds",
                         "Run durations, start to final status, by saga and outcome (the final status).",
                         read.run_durations, labels=("saga", "outcome"))
        took = GaugeMetricFamily("sagaflow_metrics_collect_seconds", "Time the queries behind this scrape took.")
        took.add_metric([], time.perf_counter() - began)
        yield took


def _histogram(name: str, doc: str, data: dict, labels=("saga", "step")) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for key, h in sorted(data.items()):
        buckets = [(_bound(b), c) for b, c in zip(h.buckets, h.cumulative, strict=True)] + [("+Inf", h.count)]
        family.add_metric(list(key), buckets, sum_value=h.sum)
    return family


def _bound(value: float) -> str:
    return repr(float(value))


def make_registry() -> CollectorRegistry:
    """A registry of sagaflow's metrics only: no per-process Python metrics, which would differ between the
    web processes that happen to answer a scrape."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SagaflowCollector())
    return reg


_registry = make_registry()


@metrics.get("/metrics")
def scrape():
    # Text format 0.0.4: the one every Prometheus version reads.
    return Response(generate_latest(_registry), content_type=CONTENT_TYPE_PLAIN_0_0_4,
                    headers={"Cache-Control": "no-store"})
