"""The fault soak (tests/soak.py) in its short form: 200 runs with random faults and 2 worker kills, every
invariant then checked in SQL. The full one (1,000 runs) is marked `soak`: `pytest -m soak`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ARTIFACTS, ROOT


def _soak(services, runs: int, kills: int) -> dict:
    if services.broker_missing:
        pytest.skip(f"SAGAFLOW_TEST_BROKER asks for a broker that is not here: {services.broker_missing}")
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / f"soak-{runs}.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.soak", "--runs", str(runs), "--kills", str(kills),
             "--pg-admin-url", services.pg_admin_url,
             # Never the session's broker: the session worker (another database) would take the soak's messages
             # and drop them. SAGAFLOW_TEST_BROKER=rabbitmq: a vhost of the soak's own (else a throwaway Redis).
             "--broker", "redis" if services.broker_url == services.redis_url else "rabbitmq"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, timeout=1800,
        )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=1))
    assert summary["violations"] == [] and proc.returncode == 0
    assert summary["runs"] == runs
    assert summary["broker"].split("@")[-1] != services.broker_url.split("@")[-1]  # its own vhost or server
    assert sum(summary["kills"].values()) >= 1
    assert set(summary["statuses"]) <= {"succeeded", "compensated", "compensation_failed"}
    return summary


@pytest.mark.integration
def test_short_soak_every_run_ends_and_every_invariant_holds(services):
    _soak(services, runs=200, kills=2)


@pytest.mark.soak
def test_full_soak(services):
    _soak(services, runs=1000, kills=6)
