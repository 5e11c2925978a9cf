"""rungs (each successive-halving decision of a sweep point, with its reason), sweeps.trials_asked (a TPE sweep's
trial counter) and Optuna's study storage

Optuna's RDB storage (studies, trials, their params, intermediate and final values) lives in the same database as
tunequeue's tables. Its tables are created here from Optuna's own schema, so that no Optuna process ever creates
tables at run time; Optuna shares the `alembic_version` table name with us, so tunequeue opens its storage with
`skip_compatibility_check` (models/search.py `optuna_storage`); pyproject.toml pins the Optuna minor version
whose schema this revision creates. The `pruned` job state needs no change: jobs.status is a plain string column.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24 12:00:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0011'
down_revision: Union[str, None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'rungs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('rung', sa.Integer(), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('metric', sa.String(length=32), nullable=False),
        sa.Column('value', sa.Float(), nullable=True),
        sa.Column('decision', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'step', name='uq_rung_job_step'),
    )
    with op.batch_alter_table('rungs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rungs_job_id'), ['job_id'], unique=False)
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trials_asked', sa.Integer(), server_default='0', nullable=False))
    from optuna.storages._rdb import models as optuna_models

    optuna_models.BaseModel.metadata.create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    from optuna.storages._rdb import models as optuna_models

    optuna_models.BaseModel.metadata.drop_all(op.get_bind(), checkfirst=True)
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.drop_column('trials_asked')
    with op.batch_alter_table('rungs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rungs_job_id'))
    op.drop_table('rungs')
