"""a run's priority kept on its row (saga_runs.priority), for what the sweeper and operators publish for it

Revision ID: 0010_priority
Revises: 0009_map
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0010_priority'
down_revision = '0009_map'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Runs started before keep 0, the default every run had.
    with op.batch_alter_table('saga_runs') as batch:
        batch.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('saga_runs') as batch:
        batch.drop_column('priority')
