"""map steps: saga_map_items (one row per item of a map step's list)

Revision ID: 0009_map
Revises: 0008_limits
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0009_map'
down_revision = '0008_limits'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saga_map_items',
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('item', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claim', sa.String(length=300), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('dispatched_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['saga_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'idx', 'item')
    )
    op.create_index('ix_saga_map_items_status', 'saga_map_items', ['run_id', 'idx', 'status', 'item'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_saga_map_items_status', table_name='saga_map_items')
    op.drop_table('saga_map_items')
