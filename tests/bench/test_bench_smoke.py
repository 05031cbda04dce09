"""The benchmark end to end in its smallest size, so the harness does not rot: every figure is produced
and every run of both sides ended as it should. About a minute (three workers start, and the demo runs),
so it is not in the default suite: `pytest -m bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from bench.figures import PHASES, SIZES, expected_figures
from tests.conftest import ROOT
from tests.services import find_services

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def services():
    found = find_services()
    yield found
    found.stop()


def bench_redis_url(tests_redis_url: str) -> str:
    """The bench's own db number on the server the tests found (never the tests' db, which it flushes)."""
    if os.environ.get("BENCH_REDIS_URL"):
        return os.environ["BENCH_REDIS_URL"]
    return urlsplit(tests_redis_url)._replace(path="/12").geturl()


def test_smoke_run_produces_every_figure_with_every_outcome_checked(services, tmp_path):
    out = tmp_path / "bench.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out), "--workdir", str(tmp_path / "work"),
         "--redis-url", bench_redis_url(services.redis_url), "--pg-admin-url", services.pg_admin_url,
         "--database", os.environ.get("BENCH_DATABASE", "sagaflow_bench_smoke")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["name"] == "run_info" and lines[-1]["name"] == "summary"
    assert lines[-1]["outcome_checks_passed"] is True, lines[-1]["problems"]
    figures = {f["name"]: f for f in lines[1:-1]}
    assert list(figures) == expected_figures(SIZES["smoke"], PHASES)
    for f in figures.values():
        assert f["checked"] is True, f
        assert f["sagaflow"] is not None and f["sagaflow"] > 0, f
    for name in ("w1_throughput", "w2_latency_p50", "step_cost_64", "runs_20_throughput", "worker_rss_after"):
        assert figures[name]["plain"] > 0 and figures[name]["ratio"] > 0
    assert figures["sql_round_trips_per_step"]["extra"]["agrees_with_listeners"] is True
    assert "W1 throughput" in done.stdout and "outcome checks: every run ended as it should" in done.stdout
