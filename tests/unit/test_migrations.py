from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from sagaflow.store.migrate import downgrade, head_revision, upgrade
from sagaflow.store.tables import metadata


def test_migrations_build_exactly_the_tables_the_code_uses_and_downgrade_cleanly(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    downgrade(url, "base")
    assert not {"saga_runs", "saga_steps", "saga_events"} & set(inspect(engine).get_table_names())


def test_a_database_behind_the_latest_migration_is_refused_with_what_to_run(tmp_path):
    import pytest

    from sagaflow.errors import SchemaMissing
    from sagaflow.store import Store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    with pytest.raises(SchemaMissing, match="no sagaflow tables: run `sagaflow db upgrade`"):
        store.check_schema()
    upgrade(url)
    store.check_schema()
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    with pytest.raises(SchemaMissing,
                       match=f"at schema revision 0000, this sagaflow needs {head_revision()}: run `sagaflow db"):
        store.check_schema()


def test_runs_recorded_before_0002_read_back_with_the_defaults_of_the_new_columns(tmp_path):
    import datetime as dt

    from sqlalchemy import text

    from sagaflow.store import Store

    url = f"sqlite:///{tmp_path / 'old-runs.db'}"
    upgrade(url, "0001")
    now = dt.datetime(2026, 11, 30, 12, 0)
    with create_engine(url).begin() as conn:
        conn.execute(text("INSERT INTO saga_runs (id, saga, saga_version, status, input, cancel_requested, "
                          "created_at, updated_at) VALUES ('r1', 's', 1, 'succeeded', '{}', 0, :now, :now)"),
                     {"now": now})
        conn.execute(text("INSERT INTO saga_steps (run_id, idx, name, status, has_compensation, attempts, "
                          "compensation_attempts, compensation_round_attempts) "
                          "VALUES ('r1', 0, 'a', 'succeeded', 1, 1, 0, 0)"))
    upgrade(url)
    run = Store(url).get_run("r1")
    assert (run.mode, run.parent_run_id, run.children) == ("saga", None, ())
    step = run.steps[0]
    assert ((step.kind, step.best_effort, step.non_atomic, step.pivot, step.group)
            == ("action", False, False, False, None))
