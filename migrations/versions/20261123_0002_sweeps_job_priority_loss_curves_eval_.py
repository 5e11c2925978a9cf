"""sweeps, job priority, loss curves, eval losses

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:39:30.119267
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('sweeps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('loss_points',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('eval_loss', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'step', name='uq_loss_point')
    )
    with op.batch_alter_table('loss_points', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_loss_points_job_id'), ['job_id'], unique=False)

    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('eval_loss', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('best_eval_loss', sa.Float(), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sweep_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='0'))
        batch_op.create_index(batch_op.f('ix_jobs_sweep_id'), ['sweep_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_sweep_id_sweeps', 'sweeps', ['sweep_id'], ['id'], ondelete='SET NULL')



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_sweep_id_sweeps', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_sweep_id'))
        batch_op.drop_column('priority')
        batch_op.drop_column('sweep_id')

    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_column('best_eval_loss')
        batch_op.drop_column('eval_loss')

    with op.batch_alter_table('loss_points', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_loss_points_job_id'))

    op.drop_table('loss_points')
    op.drop_table('sweeps')
