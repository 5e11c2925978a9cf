"""judgements (the LLM judge's per-example verdicts: score or unparsed, reason, raw reply) and metrics.settings
(how a model-based metric was computed: BERTScore's model and layer, the judge's backend and model)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 09:00:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0010'
down_revision: Union[str, None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'judgements',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('generation_id', sa.Integer(), nullable=True),
        sa.Column('variant', sa.String(length=64), nullable=False),
        sa.Column('example_id', sa.String(length=128), nullable=False),
        sa.Column('criterion', sa.String(length=32), nullable=False),
        sa.Column('score', sa.Float(), nullable=True),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('raw', sa.Text(), nullable=True),
        sa.Column('parsed', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['generation_id'], ['generations.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'variant', 'example_id', 'criterion', name='uq_judgement'),
    )
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_judgements_job_id'), ['job_id'], unique=False)
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('settings', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_column('settings')
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_judgements_job_id'))
    op.drop_table('judgements')
