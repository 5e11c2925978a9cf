"""jobs.traceback (the last lines of a failed attempt's traceback, for `jobs show` on any machine),
sweeps.notify_url (where the sweep's end is announced) and sweeps.finished_at (set once, when the sweep's last job
ended: the condition that makes its notification go out exactly once)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 04:50:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceback', sa.Text(), nullable=True))
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.add_column(sa.Column('notify_url', sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.drop_column('finished_at')
        batch_op.drop_column('notify_url')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('traceback')
