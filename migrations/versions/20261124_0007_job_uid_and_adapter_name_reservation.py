"""jobs.uid (checkpoints are kept under it, unique across databases sharing a home) and jobs.output_name with a
unique index over queued and running jobs (an adapter name is reserved at enqueue)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 02:30:00
"""
import uuid
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uid', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('output_name', sa.String(length=64), nullable=True))
    jobs = sa.table('jobs', sa.column('id', sa.Integer), sa.column('uid', sa.String), sa.column('kind', sa.String),
                    sa.column('status', sa.String), sa.column('spec', sa.JSON), sa.column('output_name', sa.String))
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.kind, jobs.c.status, jobs.c.spec)).all()
    for job_id, kind, status, spec in rows:
        active = kind == 'finetune' and status in ('queued', 'running')
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(
            uid=uuid.uuid4().hex, output_name=(spec or {}).get('name') if active else None))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('uid', existing_type=sa.String(length=32), nullable=False)
        batch_op.create_unique_constraint('uq_jobs_uid', ['uid'])
    op.create_index('uq_active_output_name', 'jobs', ['output_name'], unique=True,
                    postgresql_where=ACTIVE, sqlite_where=ACTIVE)


def downgrade() -> None:
    op.drop_index('uq_active_output_name', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_jobs_uid', type_='unique')
        batch_op.drop_column('output_name')
        batch_op.drop_column('uid')
