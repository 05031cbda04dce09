"""PgBouncer in transaction mode between sagaflow and PostgreSQL (a PgBouncer of the test's own): the fast
path's prepared statements either are switched off by setting (SAGAFLOW_PREPARED_STATEMENTS=false) or are
found not to reach their session, and each transition still runs exactly once. The whole core suite runs
through PgBouncer with SAGAFLOW_TEST_PGBOUNCER=1 (tests/services.py)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from sagaflow.model import ClaimOutcome
from sagaflow.store import Store
from sagaflow.store.migrate import upgrade
from tests.services import TEST_DATABASE, Services, fresh_database, start_pgbouncer

pytestmark = pytest.mark.integration
STEPS = [("a", True), ("b", True)]


@pytest.fixture(scope="module")
def pooled_url(services):
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        pytest.skip("pgbouncer is not installed (apt-get install -y pgbouncer)")
    direct = fresh_database(services.pg_admin_url, f"{TEST_DATABASE}_bouncer")  # our own, dropped and made
    upgrade(direct)
    own = Services("", "")
    port = start_pgbouncer(own, services.pg_admin_url, Path(tempfile.mkdtemp(prefix="sagaflow-pgbouncer-")))
    yield Services("", "", pgbouncer_port=port).pooled(direct)
    own.stop()


def run_two_steps(store: Store, concurrent: int = 8) -> list[bool]:
    """A few runs at once, through the fast path: each claim and completion happens once."""
    stores = [store] + [Store(store.url, prepared_statements=store.fast.prepared) for _ in range(concurrent - 1)]
    for i, s in enumerate(stores):
        run_id = f"r{i}-{uuid.uuid4().hex[:8]}"
        s.create_run(run_id, "s", 1, {"i": i}, STEPS)
        for idx in range(2):
            claim = s.claim_step(run_id, idx, f"t{idx}:0", [], 60)
            assert claim.outcome is ClaimOutcome.CLAIMED and claim.attempt == 1
            assert s.claim_step(run_id, idx, f"t{idx}:0", [], 60).outcome is ClaimOutcome.BUSY  # a duplicate
            if idx == 0:
                assert s.complete_step(run_id, idx, f"t{idx}:0", {"n": idx})
            else:
                assert s.complete_last_step(run_id, idx, f"t{idx}:0", {"n": idx}) == "succeeded"
        run = s.get_run(run_id)
        assert run.status == "succeeded" and [st.attempts for st in run.steps] == [1, 1]
        assert [e.kind for e in run.events].count("step_succeeded") == 2
    prepared = [s.fast.prepared for s in stores]
    for s in stores[1:]:
        s.dispose()
    return prepared


def test_prepared_statements_switched_off_by_setting_run_through_pgbouncer(pooled_url):
    store = Store(pooled_url, prepared_statements=False)
    try:
        assert run_two_steps(store) == [False] * 8
    finally:
        store.dispose()


def test_the_fast_path_notices_pgbouncer_and_sends_its_statements_as_text(pooled_url):
    store = Store(pooled_url)  # prepared statements on, as by default
    try:
        assert store.fast.prepared
        # A process whose PREPARE and EXECUTE reached different server sessions sends text from then on (one
        # alone may keep its server connection, and its prepared statements work).
        assert False in run_two_steps(store)
    finally:
        store.dispose()
