"""job_waits: a job that runs once several jobs have finished (a sweep's one evaluation job after its fine-tunes)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 23:40:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('job_waits',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('waits_for_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['waits_for_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'waits_for_id')
    )
    with op.batch_alter_table('job_waits', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_waits_waits_for_id'), ['waits_for_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_waits', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_waits_waits_for_id'))
    op.drop_table('job_waits')
