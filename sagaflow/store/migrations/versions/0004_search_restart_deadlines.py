"""operator's day: a GIN index for input search (PostgreSQL), restarted_from (restart links), deadline_at,
saga_totals (what pruned runs counted)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('saga_runs') as batch:
        batch.add_column(sa.Column('restarted_from', sa.String(length=36), nullable=True))
        batch.add_column(sa.Column('deadline_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('counted', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_saga_runs_restarted_from', 'saga_runs', ['restarted_from'], unique=False)
    op.create_index('ix_saga_runs_deadline', 'saga_runs', ['deadline_at'], unique=False)
    op.create_index('ix_saga_runs_counted', 'saga_runs', ['counted', 'saga'], unique=False)
    op.create_table('saga_totals',
    sa.Column('metric', sa.String(length=40), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('step', sa.String(length=200), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('metric', 'saga', 'step', 'label')
    )
    if op.get_bind().dialect.name == 'postgresql':
        # input search (store/search.py): containment (@>) of top-level fields, answered from this index.
        op.execute('CREATE INDEX ix_saga_runs_input ON saga_runs USING gin ((input::jsonb) jsonb_path_ops)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP INDEX IF EXISTS ix_saga_runs_input')
    op.drop_table('saga_totals')
    op.drop_index('ix_saga_runs_counted', table_name='saga_runs')
    op.drop_index('ix_saga_runs_deadline', table_name='saga_runs')
    op.drop_index('ix_saga_runs_restarted_from', table_name='saga_runs')
    with op.batch_alter_table('saga_runs') as batch:
        batch.drop_column('counted')
        batch.drop_column('deadline_at')
        batch.drop_column('restarted_from')
