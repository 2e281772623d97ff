"""job timing: queue wait (enqueued -> a worker took it) and start-up (-> the job's first log line)

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue_wait_seconds', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('startup_seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('startup_seconds')
        batch_op.drop_column('queue_wait_seconds')
