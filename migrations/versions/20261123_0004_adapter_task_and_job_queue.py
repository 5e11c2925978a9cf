"""adapter task (seq2seq / causal / classification), the queue a job was published to and when

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 20:10:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task', sa.String(length=16), nullable=False, server_default='seq2seq'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('queued_at')
        batch_op.drop_column('queue')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_column('task')
