"""adapters.task renamed model_kind: "task" means a Celery task only

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 02:10:00
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.alter_column('task', new_column_name='model_kind')


def downgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.alter_column('model_kind', new_column_name='task')
