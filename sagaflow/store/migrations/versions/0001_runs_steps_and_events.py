"""runs, steps and events

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saga_runs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('saga_version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('input', sa.JSON(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('saga_runs', schema=None) as batch_op:
        batch_op.create_index('ix_saga_runs_created', ['created_at'], unique=False)
        batch_op.create_index('ix_saga_runs_idempotency_key', ['idempotency_key'], unique=True)
        batch_op.create_index('ix_saga_runs_saga_created', ['saga', 'created_at'], unique=False)
        batch_op.create_index('ix_saga_runs_status_created', ['status', 'created_at'], unique=False)

    op.create_table('saga_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('step', sa.String(length=200), nullable=True),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['saga_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('saga_events', schema=None) as batch_op:
        batch_op.create_index('ix_saga_events_run_id', ['run_id', 'id'], unique=False)

    op.create_table('saga_steps',
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('has_compensation', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('compensation_attempts', sa.Integer(), nullable=False),
    sa.Column('compensation_round_attempts', sa.Integer(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('compensation_error', sa.Text(), nullable=True),
    sa.Column('task_id', sa.String(length=255), nullable=True),
    sa.Column('compensation_task_id', sa.String(length=255), nullable=True),
    sa.Column('claim', sa.String(length=300), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('compensated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['saga_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'idx')
    )


def downgrade() -> None:
    op.drop_table('saga_steps')
    with op.batch_alter_table('saga_events', schema=None) as batch_op:
        batch_op.drop_index('ix_saga_events_run_id')

    op.drop_table('saga_events')
    with op.batch_alter_table('saga_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_saga_runs_status_created')
        batch_op.drop_index('ix_saga_runs_saga_created')
        batch_op.drop_index('ix_saga_runs_idempotency_key')
        batch_op.drop_index('ix_saga_runs_created')

    op.drop_table('saga_runs')
