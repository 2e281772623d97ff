"""deliveries.old_sha: the commit a push moved main away from, so a queued job whose commit a later push built on
is known to be superseded before any process starts (issue 10: a superseded job never starts a process)

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('old_sha', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('old_sha')
