"""web app: operator sessions (revoked at logout) and failed-authentication counts (throttling)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saga_operator_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_saga_operator_sessions_expires', 'saga_operator_sessions', ['expires_at'], unique=False)
    op.create_table('saga_auth_failures',
    sa.Column('client', sa.String(length=100), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('window_start', sa.DateTime(), nullable=False),
    sa.Column('last_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('client')
    )


def downgrade() -> None:
    op.drop_table('saga_auth_failures')
    op.drop_index('ix_saga_operator_sessions_expires', table_name='saga_operator_sessions')
    op.drop_table('saga_operator_sessions')
