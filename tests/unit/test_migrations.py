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
