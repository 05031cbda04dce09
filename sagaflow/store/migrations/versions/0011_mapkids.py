"""map steps whose items are child runs: the child's item (saga_runs.parent_item) and each item's child
(saga_map_items.child_run_id)

Revision ID: 0011_mapkids
Revises: 0010_priority
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0011_mapkids'
down_revision = '0010_priority'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('saga_runs') as batch:
        batch.add_column(sa.Column('parent_item', sa.Integer(), nullable=True))
    with op.batch_alter_table('saga_map_items') as batch:
        batch.add_column(sa.Column('child_run_id', sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('saga_map_items') as batch:
        batch.drop_column('child_run_id')
    with op.batch_alter_table('saga_runs') as batch:
        batch.drop_column('parent_item')
