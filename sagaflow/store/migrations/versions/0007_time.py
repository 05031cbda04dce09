"""time as a step: saga_runs.start_at (delayed starts, status scheduled) and saga_schedules (cron schedules)

Revision ID: 0007_time
Revises: 0006_totals
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0007_time'
down_revision = '0006_totals'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('saga_runs') as batch:
        batch.add_column(sa.Column('start_at', sa.DateTime(), nullable=True))
        batch.create_index('ix_saga_runs_start_at', ['start_at'], unique=False)
    op.create_table('saga_schedules',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('cron', sa.String(length=200), nullable=False),
    sa.Column('input', sa.JSON(), nullable=False),
    sa.Column('paused', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('catchup', sa.String(length=16), server_default='skip', nullable=False),
    sa.Column('next_fire_at', sa.DateTime(), nullable=False),
    sa.Column('last_fired_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_index('ix_saga_schedules_due', 'saga_schedules', ['paused', 'next_fire_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_saga_schedules_due', table_name='saga_schedules')
    op.drop_table('saga_schedules')
    with op.batch_alter_table('saga_runs') as batch:
        batch.drop_index('ix_saga_runs_start_at')
        batch.drop_column('start_at')
