"""The model (sagaflow/model/): its rules, its event kinds, and the layout around it: the model imports
nothing of sagaflow but errors; the store names every event kind through EventKind; the faces (web/,
sagaflow/cli/) reach the database only through SagaClient and ask the model what a run allows."""

import ast
import datetime as dt
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sagaflow.model import (
    CANCELLABLE_RUN_STATUSES,
    FINAL_RUN_STATUSES,
    LIVE_RUN_STATUSES,
    RETRYABLE_RUN_STATUSES,
    EventKind,
    Run,
    RunStatus,
    StepSpec,
    StepState,
    StepStatus,
)
from sagaflow.model.status import compensation_rate, counts_by_status
from sagaflow.store import tables as t
from sagaflow.store.guards import event

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _run(status, cancel_requested=False, steps=()):
    return Run("r", "s", 1, status, {}, None, cancel_requested, None, T0, T0, None, tuple(steps))


def _step(name, status, pivot=False):
    return StepState(0, name, status, True, 1, 0, None, None, None, None, None, None, None, None, pivot=pivot)


# ---------------------------------------------------------------------------------------------- rules


def test_every_run_status_is_either_live_or_final():
    assert LIVE_RUN_STATUSES | FINAL_RUN_STATUSES == set(RunStatus)
    assert not LIVE_RUN_STATUSES & FINAL_RUN_STATUSES
    assert CANCELLABLE_RUN_STATUSES < LIVE_RUN_STATUSES and RETRYABLE_RUN_STATUSES < FINAL_RUN_STATUSES


@pytest.mark.parametrize("status", list(RunStatus))
def test_what_each_run_status_allows(status):
    run = _run(status.value)
    assert run.is_live == (status.value in ("pending", "running", "compensating", "waiting", "scheduled", "queued"))
    assert run.is_final == (not run.is_live)
    assert run.can_cancel == (status.value in ("pending", "running", "waiting", "scheduled", "queued"))
    assert run.can_retry == (status.value in ("compensation_failed", "stuck"))
    assert not run.cancel_pending


def test_a_run_cannot_be_cancelled_twice_nor_past_its_pivot():
    asked = _run("running", cancel_requested=True)
    assert not asked.can_cancel and asked.cancel_pending
    assert not _run("compensating", cancel_requested=True).cancel_pending  # acted on: it compensates
    before = _run("running", steps=[_step("charge", "running", pivot=True)])
    assert before.can_cancel and before.past_pivot is None
    past = _run("running", steps=[_step("charge", "succeeded", pivot=True), _step("ship", "running")])
    assert past.past_pivot == "charge" and not past.can_cancel


def test_counts_by_status_and_the_compensation_rate():
    counts = {("a", "compensated"): 3, ("b", "succeeded"): 1, ("b", "running"): 5}
    by_status = counts_by_status(counts)
    assert list(by_status) == [s.value for s in RunStatus]
    assert by_status["compensated"] == 3 and by_status["pending"] == 0
    assert compensation_rate(counts) == 0.75 and compensation_rate({}) is None


def test_step_spec_reads_a_definition_step():
    from sagaflow.model.definition import Step

    steps = [Step("a", lambda ctx: 1, lambda ctx: None), Step("b", lambda ctx: 2, pivot=True)]
    assert [StepSpec.of(s) for s in steps] == [StepSpec("a", True), StepSpec("b", False, pivot=True)]


# ---------------------------------------------------------------------------------------------- events


def test_event_kinds_keep_their_stored_text():
    assert all(kind.value == kind.name.lower() for kind in EventKind)
    assert str(EventKind.STEP_SUCCEEDED) == "step_succeeded" == EventKind.STEP_SUCCEEDED
    assert EventKind.run_ended(RunStatus.COMPENSATED) is EventKind.RUN_COMPENSATED
    assert EventKind.run_ended("cancelled") is EventKind.RUN_CANCELLED


def test_every_event_kind_is_written_or_read_by_the_store():
    """The enum lists what the store uses, no more: each member is named in sagaflow/store/, or is a run's end
    (EventKind.run_ended(final), in Python and in the fast path's SQL), which the stats count."""
    from sagaflow.store.stats import END_EVENTS

    named = {EventKind(kind).name for kind in END_EVENTS}
    for path in (ROOT / "sagaflow" / "store").glob("*.py"):
        named |= set(re.findall(r"EventKind\.([A-Z_]+)\b", path.read_text()))
    assert named == {kind.name for kind in EventKind}


def _string_literals(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def _checked_modules():
    """The store (but its table definitions: cancel_requested is a column there too), the faces and the
    client."""
    store = [p for p in (ROOT / "sagaflow" / "store").glob("*.py") if p.name != "tables.py"]
    return store + sorted((ROOT / "web").glob("*.py")) + [ROOT / "sagaflow" / "client.py"] + sorted(
        (ROOT / "sagaflow" / "cli").glob("*.py"))


def test_no_bare_event_kind_strings_outside_the_model():
    kinds = {kind.value for kind in EventKind}
    # A kind quoted inside SQL text (a step's status compensation_failed has the same text: not that one).
    sql_kind = re.compile(r"(?<!status = )'(%s)'" % "|".join(sorted(kinds)))
    found = []
    for path in _checked_modules():
        for line, value in _string_literals(path):
            if value in kinds or sql_kind.search(value):
                found.append(f"{path.relative_to(ROOT)}:{line}: {value[:60]!r}")
    assert not found, "name event kinds through sagaflow.model.EventKind:\n" + "\n".join(found)


def test_an_event_of_no_known_kind_is_refused_and_writes_nothing(store):
    def events():
        with store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t.events)).scalar()

    run, _ = store.create_run("r-kind", "s", 1, {}, [StepSpec("a", True)])
    before = events()
    with pytest.raises(ValueError):
        with store.engine.begin() as conn:
            event(conn, run.id, "step_exploded", "a", None, T0)
    assert events() == before
    with store.engine.begin() as conn:
        event(conn, run.id, EventKind.STEP_STARTED, "a", {"attempt": 1}, T0)
    with store.engine.connect() as conn:
        kinds = conn.execute(select(t.events.c.kind).where(t.events.c.run_id == run.id).order_by(t.events.c.id))
        assert [row.kind for row in kinds] == ["run_started", "step_started"]


# ---------------------------------------------------------------------------------------------- layout


def _imports(path: Path):
    """(line, dotted name) of everything the file imports, function-level imports included: ``import a.b``
    gives a.b, ``from a import b`` gives a.b (a module or a name in it)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def test_the_model_imports_nothing_of_sagaflow_but_errors():
    found = [f"{p.name}:{line}: {module}" for p in (ROOT / "sagaflow" / "model").glob("*.py")
             for line, module in _imports(p)
             if module.startswith("sagaflow.") and not module.startswith(("sagaflow.model.", "sagaflow.errors."))]
    assert not found, found


def _faces():
    return sorted((ROOT / "web").glob("*.py")) + sorted((ROOT / "sagaflow" / "cli").glob("*.py"))


def test_the_faces_never_import_the_store():
    """web/ and cli/ use SagaClient and the model; `sagaflow db upgrade/downgrade` alone run the store's
    migrations."""
    allowed = {"sagaflow.store.migrate", "sagaflow.store.migrate.MIGRATIONS"}
    found = []
    for path in _faces():
        for line, module in _imports(path):
            if (module == "sagaflow.store" or module.startswith("sagaflow.store.")) and not (
                    path == ROOT / "sagaflow" / "cli" / "database.py" and module in allowed):
                found.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not found, found


def test_the_faces_never_touch_an_engine():
    found = []
    for path in _faces():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("engine", "store", "autocommit", "transactional"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not found, found


def test_the_faces_keep_no_list_of_statuses():
    """Which status allows which action is the model's rule: no face compares a status with a tuple of
    literal statuses (pages, templates)."""
    statuses = {s.value for s in RunStatus} | {s.value for s in StepStatus}
    found = []
    for path in [*_faces(), *sorted((ROOT / "web" / "templates").glob("*.html"))]:
        text = path.read_text()
        for match in re.finditer(r"\bin \(([^()]*)\)", text):
            quoted = re.findall(r"""['"]([a-z_]+)['"]""", match.group(1))
            if quoted and set(quoted) <= statuses:
                found.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not found, found
