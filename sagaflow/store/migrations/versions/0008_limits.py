"""limits across every worker: saga_slots, saga_slot_waiters (max_concurrent_runs, a step's concurrency),
saga_rate_starts (a step's rate_limit)

Revision ID: 0008_limits
Revises: 0007_time
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0008_limits'
down_revision = '0007_time'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saga_slots',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=False),
    sa.Column('acquired_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'run_id', 'idx')
    )
    op.create_table('saga_slot_waiters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('saga_version', sa.Integer(), nullable=False),
    sa.Column('queued_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', 'run_id', 'idx', name='uq_saga_slot_waiters')
    )
    op.create_index('ix_saga_slot_waiters_key', 'saga_slot_waiters', ['key', 'id'], unique=False)
    op.create_index('ix_saga_slot_waiters_run', 'saga_slot_waiters', ['run_id'], unique=False)
    op.create_table('saga_rate_starts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_saga_rate_starts_key_at', 'saga_rate_starts', ['key', 'at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_saga_rate_starts_key_at', table_name='saga_rate_starts')
    op.drop_table('saga_rate_starts')
    op.drop_index('ix_saga_slot_waiters_run', table_name='saga_slot_waiters')
    op.drop_index('ix_saga_slot_waiters_key', table_name='saga_slot_waiters')
    op.drop_table('saga_slot_waiters')
    op.drop_table('saga_slots')
