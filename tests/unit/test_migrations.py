from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from sagaflow.store.migrate import downgrade, upgrade
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
    with pytest.raises(SchemaMissing, match="at schema revision 0000, this sagaflow needs 0002: run `sagaflow db"):
        store.check_schema()
