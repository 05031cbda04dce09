"""Versions side by side: runs of version 1 that are in flight when version 2 is registered finish, or
compensate, with version 1's steps; new runs use version 2.

The worker imported tests/sagas.py, which registers both versions (v1 first). This process plays a client
deployed before v2 existed: it knows only v1 while it starts the first runs, then registers v2 (the new
deploy) and starts more. client.start always uses the latest version it knows."""

from __future__ import annotations

import pytest

from sagaflow.model.definition import registry
from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds, wait_for
from tests.sagas import versioned_v1, versioned_v2

pytestmark = pytest.mark.integration

V1 = ["reserve", "notify", "charge"]
V2 = ["check_fraud", "reserve", "notify", "charge", "receipt"]


@pytest.fixture
def client_knows_only_v1():
    registry.remove("versioned")
    registry.add(versioned_v1)
    yield
    registry.remove("versioned")
    registry.add(versioned_v1)
    registry.add(versioned_v2)


def test_in_flight_v1_runs_keep_v1_steps_while_new_runs_use_v2(client, client_knows_only_v1):
    slow = {"sleep": {"reserve": 2.0}}
    v1_ok = client.start("versioned", slow)
    v1_fails = client.start("versioned", {**slow, "fail_at": "charge"})
    for run in (v1_ok, v1_fails):
        assert run.saga_version == 1
        wait_for(lambda run=run: client.get(run.id).step("reserve").status == "running", what="a v1 run in flight")

    registry.add(versioned_v2)  # the deploy: v2 is now the latest here as in the worker
    v2_ok = client.start("versioned", {})
    v2_fails = client.start("versioned", {"fail_at": "receipt"})
    assert (v2_ok.saga_version, v2_fails.saga_version) == (2, 2)
    assert {client.get(r.id).status for r in (v1_ok, v1_fails)} == {"running"}  # still in flight

    v1_ok, v1_fails, v2_ok, v2_fails = (client.wait(r.id, timeout=60) for r in (v1_ok, v1_fails, v2_ok, v2_fails))

    # v1, in flight across the deploy: v1's steps, v1's functions, v1's compensations.
    assert v1_ok.status == "succeeded", v1_ok
    assert [s.name for s in v1_ok.steps] == V1
    assert [s.result["version"] for s in v1_ok.steps] == [1, 1, 1]
    assert effects_of(v1_ok.id) == [("do", n) for n in V1]
    assert v1_fails.status == "compensated", v1_fails
    # v1's notify has no compensation (v2's has one): only reserve is undone.
    assert effects_of(v1_fails.id) == [("do", "reserve"), ("do", "notify"), ("undo", "reserve")]
    assert kinds(v1_fails, "compensation_succeeded") == [("compensation_succeeded", "reserve")]

    # v2, started after the deploy: v2's steps and compensations.
    assert v2_ok.status == "succeeded", v2_ok
    assert [s.name for s in v2_ok.steps] == V2
    assert {s.result["version"] for s in v2_ok.steps} == {2}
    assert effects_of(v2_ok.id) == [("do", n) for n in V2]
    assert v2_fails.status == "compensated", v2_fails
    assert effects_of(v2_fails.id) == [("do", n) for n in V2[:-1]] + [
        ("undo", "charge"), ("undo", "notify"), ("undo", "reserve")]

    assert [r.saga_version for r in (v1_ok, v1_fails, v2_ok, v2_fails)] == [1, 1, 2, 2]
