"""/metrics counts what was run: runs spread over a 4-process prefork worker, scraped over HTTP, and every
counter, gauge and histogram count moves by exactly what those runs did."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from tests.integration.conftest import WEB_TOKEN
from tests.web_client import call

pytestmark = pytest.mark.integration

SAGA = "data_ingest"  # ingest, parse, embed, expose; every step has a compensation


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    answer = call("GET", f"{url}/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    """The sum over the series of ``name`` that carry ``labels`` (e.g. every outcome of a step's histogram)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def delta(before, after, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def settle(client):
    wait_for(lambda: all(not client.list(status=s, saga=SAGA).total for s in ("pending", "running", "compensating")),
             timeout=60, what="every data_ingest run to settle")


def test_metrics_count_what_ran_across_worker_processes(web_url, client):
    settle(client)
    before = scrape(web_url)

    inputs = [
        {},                                                         # succeeds
        {},                                                         # succeeds
        {"flaky": {"parse": 1}},                                    # one retry of parse, then succeeds
        {"fail_at": "embed"},                                       # parse and ingest undone
        {"fail_at": "parse", "fail_compensation": {"ingest": 1}},   # the undo of ingest retried once
        {"fail_at": "parse", "fail_compensation": {"ingest": 4}},   # the undo gives up: compensation_failed
    ]
    runs = [client.start(SAGA, data) for data in inputs]  # all at once: the 4 pool processes share them
    for run in runs:
        client.wait(run.id, timeout=60)
    stuck = runs[-1].id
    assert client.get(stuck).status == "compensation_failed"

    mid = scrape(web_url)
    assert delta(before, mid, "sagaflow_runs_started_total", saga=SAGA) == 6
    assert delta(before, mid, "sagaflow_runs_finished_total", saga=SAGA, status="succeeded") == 3
    assert delta(before, mid, "sagaflow_runs_finished_total", saga=SAGA, status="compensated") == 2
    assert delta(before, mid, "sagaflow_runs_finished_total", saga=SAGA, status="compensation_failed") == 1
    assert delta(before, mid, "sagaflow_runs", saga=SAGA, status="compensation_failed") == 1
    assert delta(before, mid, "sagaflow_runs_compensation_failed", saga=SAGA) == 1
    assert delta(before, mid, "sagaflow_runs", saga=SAGA, status="succeeded") == 3

    assert delta(before, mid, "sagaflow_retries_total", saga=SAGA, step="parse", phase="action") == 1
    assert delta(before, mid, "sagaflow_retries_total", saga=SAGA, step="ingest", phase="compensation") == 1 + 2
    assert delta(before, mid, "sagaflow_compensations_total", saga=SAGA, step="ingest", outcome="succeeded") == 2
    assert delta(before, mid, "sagaflow_compensations_total", saga=SAGA, step="ingest", outcome="failed") == 1
    assert delta(before, mid, "sagaflow_compensations_total", saga=SAGA, step="parse", outcome="succeeded") == 1
    assert delta(before, mid, "sagaflow_steps_total", saga=SAGA, step="ingest", outcome="succeeded") == 6
    assert delta(before, mid, "sagaflow_steps_total", saga=SAGA, step="parse", outcome="failed") == 2
    assert delta(before, mid, "sagaflow_steps_total", saga=SAGA, step="embed", outcome="failed") == 1

    # Histograms: one observation per step that ended, one per compensation round that ended.
    assert delta(before, mid, "sagaflow_step_duration_seconds_count", saga=SAGA, step="ingest") == 6
    assert delta(before, mid, "sagaflow_step_duration_seconds_count", saga=SAGA, step="expose") == 3
    assert delta(before, mid, "sagaflow_step_duration_seconds_count", saga=SAGA, step="parse") == 6
    assert delta(before, mid, "sagaflow_compensation_duration_seconds_count", saga=SAGA, step="ingest") == 3
    assert delta(before, mid, "sagaflow_compensation_duration_seconds_count", saga=SAGA, step="parse") == 1
    assert value(mid, "sagaflow_step_duration_seconds_bucket", saga=SAGA, step="ingest", le="+Inf") == \
        value(mid, "sagaflow_step_duration_seconds_count", saga=SAGA, step="ingest")
    # The flaky parse waited 50-100 ms before its retry: the sum grew by at least that.
    assert delta(before, mid, "sagaflow_step_duration_seconds_sum", saga=SAGA, step="parse") >= 0.05

    # An operator retries the stuck run: the gauge goes back down, the counters only grow.
    assert call("POST", f"{web_url}/api/runs/{stuck}/retry").status == 202
    assert client.wait(stuck).status == "compensated"
    after = scrape(web_url)
    assert delta(before, after, "sagaflow_runs_compensation_failed", saga=SAGA) == 0
    assert delta(before, after, "sagaflow_runs_finished_total", saga=SAGA, status="compensation_failed") == 1
    assert delta(before, after, "sagaflow_runs_finished_total", saga=SAGA, status="compensated") == 3
    assert delta(before, after, "sagaflow_compensation_duration_seconds_count", saga=SAGA, step="ingest") == 4


def test_every_web_process_reports_the_same_numbers(web_url, web_token_url):
    # Two app instances (as two gunicorn workers would be) read the same store: the same samples.
    first, second = scrape(web_url), scrape(web_token_url)
    first.pop(("sagaflow_metrics_collect_seconds", ()))
    second.pop(("sagaflow_metrics_collect_seconds", ()))
    assert first == second
    assert call("GET", f"{web_token_url}/metrics", token=WEB_TOKEN).status == 200
