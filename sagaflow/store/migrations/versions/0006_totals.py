"""metrics kept by the transitions: saga_counters and saga_counter_log (store/counters.py) replace saga_totals
and the sweeper's fold (saga_runs.counted); saga_steps.compensation_started_at (the round's first claim, for
the compensation duration histogram). What the existing rows and saga_totals counted is carried over.

Revision ID: 0006_totals
Revises: 0005
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = '0006_totals'
down_revision = '0005'
branch_labels = None
depends_on = None

_HISTOGRAMS = {'run_duration': 'run_duration', 'step_duration': 'step_duration',
               'compensation_duration': 'compensation_duration'}


def upgrade() -> None:
    op.create_table('saga_counters',
    sa.Column('metric', sa.String(length=40), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('step', sa.String(length=200), nullable=False),
    sa.Column('outcome', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('metric', 'saga', 'step', 'outcome', 'label')
    )
    op.create_table('saga_counter_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('metric', sa.String(length=40), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('step', sa.String(length=200), nullable=False),
    sa.Column('outcome', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('saga_steps') as batch:
        batch.add_column(sa.Column('compensation_started_at', sa.DateTime(), nullable=True))
    _carry_over()
    op.drop_table('saga_totals')
    op.drop_index('ix_saga_runs_counted', table_name='saga_runs')
    with op.batch_alter_table('saga_runs') as batch:
        batch.drop_column('counted')


def _carry_over() -> None:
    """The counters start at what the rows there are count (their status for the live gauge) plus what runs
    pruned before this revision counted (saga_totals, histograms without an outcome: "unknown")."""
    from sagaflow.store import counters
    from sagaflow.store.retention import seed_counters

    conn = op.get_bind()
    seed_counters(conn)
    rows: list[dict] = []
    cumulative: dict[tuple, list] = {}
    for metric, saga, step, label, value in conn.execute(sa.text(
            "SELECT metric, saga, step, label, value FROM saga_totals")):
        if metric == 'runs_started':
            rows.append(counters.row('started', saga, '', int(value)))
        elif metric == 'runs_finished':
            rows.append(counters.row('finished', saga, label, int(value)))
        elif metric == 'step_events':
            rows.append(counters.row('step', saga, label, int(value), step))
        elif metric in _HISTOGRAMS:
            # run_duration kept the final status in "step"; the others had no outcome
            outcome, series_step = (step, '') if metric == 'run_duration' else ('unknown', step)
            if label == 'sum':
                rows.append(counters.row(metric, saga, outcome, round(value * 1_000_000), series_step, 'sum_us'))
            elif label == 'count' or label.startswith('le='):
                cumulative.setdefault((metric, saga, series_step, outcome), []).append((label, int(value)))
    for (metric, saga, step, outcome), labels in cumulative.items():
        by = dict(labels)
        below = 0
        for bound in counters.DURATION_BUCKETS:
            n = by.get(f'le={bound!r}', below)
            rows.append(counters.row(metric, saga, outcome, n - below, step, f'le={bound!r}'))
            below = n
        rows.append(counters.row(metric, saga, outcome, by.get('count', below) - below, step, counters.INF))
    counters.add(conn, counters.merged([r for r in rows if r['value']]))


def downgrade() -> None:
    with op.batch_alter_table('saga_runs') as batch:
        batch.add_column(sa.Column('counted', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_saga_runs_counted', 'saga_runs', ['counted', 'saga'], unique=False)
    # saga_totals comes back empty: the runs' own rows count again (what pruned runs counted is lost)
    op.create_table('saga_totals',
    sa.Column('metric', sa.String(length=40), nullable=False),
    sa.Column('saga', sa.String(length=200), nullable=False),
    sa.Column('step', sa.String(length=200), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('metric', 'saga', 'step', 'label')
    )
    with op.batch_alter_table('saga_steps') as batch:
        batch.drop_column('compensation_started_at')
    op.drop_table('saga_counter_log')
    op.drop_table('saga_counters')
