"""The declarative saga of config/sagas.yaml (handlers from tasks/ingest.py) on a real worker: the
worker loaded the file through SAGAFLOW_SAGA_FILES, as this process did (see conftest)."""

from __future__ import annotations

import pytest

from sagaflow.tasks.effects import effects_of
from tests.helpers import kinds

pytestmark = pytest.mark.integration

STEPS = ["ingest", "parse", "embed", "publish"]


def test_the_declarative_saga_runs_every_step_once_in_order(client):
    run = client.wait(client.start("ingest_document", {"source": "s3://bucket/report.pdf"}).id)

    assert run.status == "succeeded", run
    assert (run.saga, run.saga_version) == ("ingest_document", 1)
    assert [(s.name, s.status, s.attempts) for s in run.steps] == [(n, "succeeded", 1) for n in STEPS]
    assert effects_of(run.id) == [("do", n) for n in STEPS]
    # `publish` runs the handler `expose`, which names its result after the step it runs as.
    assert run.step("publish").result == {"index_alias": f"publish-{run.id[:8]}"}
    assert kinds(run)[-1] == ("run_succeeded", None)


def test_a_failing_declarative_step_compensates_with_the_named_handlers_in_reverse(client):
    run = client.wait(client.start("ingest_document", {"fail_at": "embed"}).id)

    assert run.status == "compensated", run
    assert effects_of(run.id) == [("do", "ingest"), ("do", "parse"), ("undo", "parse"), ("undo", "ingest")]
    assert [s.status for s in run.steps] == ["compensated", "compensated", "failed", "skipped"]
    assert kinds(run, "compensation_succeeded") == [("compensation_succeeded", "parse"),
                                                    ("compensation_succeeded", "ingest")]


def test_each_step_retries_with_the_kind_its_file_entry_gives(client):
    run = client.wait(client.start("ingest_document", {"flaky": {"ingest": 2, "parse": 2}}).id)

    assert run.status == "succeeded", run
    retries = [(e.step, e.detail["attempt"], e.detail["retry_in"]) for e in run.events if e.kind == "step_retried"]
    assert retries == [
        ("ingest", 1, 0.2), ("ingest", 2, 0.2),  # fixed 0.2 s, no jitter
        ("parse", 1, 0.1), ("parse", 2, 0.3),  # linear 0.1 s + 0.2 s a retry, no jitter
    ]
    assert effects_of(run.id) == [("do", n) for n in STEPS]
