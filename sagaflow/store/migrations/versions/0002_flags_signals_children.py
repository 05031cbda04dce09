"""step flags and kinds, parallel groups, gates and signals, child runs, plain-mode runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('saga_runs') as batch:
        batch.add_column(sa.Column('mode', sa.String(length=16), nullable=False, server_default='saga'))
        batch.add_column(sa.Column('parent_run_id', sa.String(length=36), nullable=True))
        batch.add_column(sa.Column('parent_step', sa.Integer(), nullable=True))
        batch.create_index('ix_saga_runs_parent', ['parent_run_id'], unique=False)
    with op.batch_alter_table('saga_steps') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='action'))
        batch.add_column(sa.Column('best_effort', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('non_atomic', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('pivot', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('branch_group', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('signal', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('deadline_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('child_run_id', sa.String(length=36), nullable=True))
    op.create_table('saga_signals',
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=True),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['saga_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'name')
    )


def downgrade() -> None:
    op.drop_table('saga_signals')
    with op.batch_alter_table('saga_steps') as batch:
        for column in ('child_run_id', 'deadline_at', 'signal', 'branch_group', 'pivot', 'non_atomic',
                       'best_effort', 'kind'):
            batch.drop_column(column)
    with op.batch_alter_table('saga_runs') as batch:
        batch.drop_index('ix_saga_runs_parent')
        for column in ('parent_step', 'parent_run_id', 'mode'):
            batch.drop_column(column)
