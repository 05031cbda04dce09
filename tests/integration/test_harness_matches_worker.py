"""sagaflow.testing gives the outcomes a real deployment gives: each example saga, through the same scenarios
(success, a business failure at each step, a flaky step, a compensation that fails once), run in the harness
(in-memory broker, a worker thread, SQLite) and on the real prefork worker (Redis, PostgreSQL). The run's
status, each step's status and attempts, the event history and the effects outside must be equal (for the
saga with parallel branches, whose order varies on both: the status, the failed steps, the effects kept)."""

from __future__ import annotations

from collections import Counter

import pytest

from sagaflow import SagaClient
from sagaflow.model.definition import registry
from sagaflow.tasks.effects import effects_of
from sagaflow.testing import SagaHarness
from tests.helpers import kinds

pytestmark = pytest.mark.integration

EXAMPLES = ["create_booking", "collect_payment", "data_ingest", "request_data"]


def scenarios() -> list[tuple[str, str, dict]]:
    cases = []
    for saga in EXAMPLES:
        names = [s.name for s in registry.get(saga).steps]
        cases.append((saga, "success", {"customer": "c1"}))
        cases += [(saga, f"fail_at {name}", {"fail_at": name}) for name in names]
        cases.append((saga, f"flaky {names[0]}", {"flaky": {names[0]: 2}}))
        cases.append((saga, f"undo of {names[0]} fails once",
                      {"fail_at": names[-1], "fail_compensation": {names[0]: 1}}))
    return cases


def outcome(client: SagaClient, run_id: str, saga: str) -> tuple:
    run = client.wait(run_id, timeout=60)
    history, effects = kinds(run), effects_of(run.id)
    if not registry.get(saga).linear:
        # Parallel branches run in either order, here as there: a branch that fails may do so before its
        # sibling started (the sibling is then skipped) or after (it is compensated). What must match: the
        # run's status, which steps failed, and that every effect that happened was undone or kept alike.
        failed = sorted(s.name for s in run.steps if s.status == "failed")
        left = Counter(step for kind, step in effects if kind == "do")
        left.subtract(Counter(step for kind, step in effects if kind == "undo"))
        return (run.status, failed, sorted((step, n) for step, n in left.items() if n))
    return (run.status, [(s.name, s.status, s.attempts) for s in run.steps], history, effects)


@pytest.fixture(scope="module")
def harness_outcomes(settings):
    cases = scenarios()
    with SagaHarness(imports=["sagaflow.tasks"]) as harness:
        client = harness.client
        assert client is not None
        started = {(saga, name): client.start(saga, data).id for saga, name, data in cases}
        return {key: outcome(client, run_id, key[0]) for key, run_id in started.items()}


@pytest.mark.parametrize("saga,name,data", scenarios(), ids=lambda v: v if isinstance(v, str) else None)
def test_the_harness_gives_the_real_workers_outcome(harness_outcomes, worker, saga, name, data):
    client = SagaClient()  # after the harness put this process's settings back
    real = outcome(client, client.start(saga, data).id, saga)
    assert harness_outcomes[(saga, name)] == real
    assert real[0] in ("succeeded", "compensated")
